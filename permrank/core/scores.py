"""Scores derived from ranks: the one place a place in a ranking becomes a number.

Two scales, both strictly decreasing down the ranking:

- ``rank_score(i, n)``: ``n - i`` (``n`` for the first, 1 for the last), what permrank's JSONL
  output, its TREC runs, evaluation runs and distillation labels hold;
- ``rank_score(i, n, unit=True)``: ``1 - i / n`` (1 for the first, ``1/n`` for the last), the
  ``relevance_score`` of the rerank APIs and PyTerrier's ``score`` for listwise methods.
"""

from __future__ import annotations


def rank_score(index: int, n: int, *, unit: bool = False) -> float:
    """The score of the candidate at ``index`` (0: the first) of ``n`` ranked candidates."""
    return 1.0 - index / n if unit else float(n - index)


def rank_scores(n: int, *, unit: bool = False) -> list[float]:
    """The scores of ``n`` ranked candidates, in ranked order."""
    return [rank_score(i, n, unit=unit) for i in range(n)]
