"""Rank-derived scores come from one place (permrank.core.scores), on the two scales in use."""

from __future__ import annotations

from permrank.core.scores import rank_score, rank_scores
from permrank.distill.labels import rank_score as label_score
from permrank.runs.evaluate import run_of


def test_the_count_scale_is_n_for_the_first_down_to_1() -> None:
    assert rank_scores(4) == [4.0, 3.0, 2.0, 1.0]
    assert [label_score(r, 4) for r in (1, 2, 3, 4)] == rank_scores(4)  # 1-based there


def test_the_unit_scale_is_1_for_the_first_down_to_1_over_n() -> None:
    assert rank_scores(4, unit=True) == [1.0, 0.75, 0.5, 0.25]
    assert rank_score(0, 1, unit=True) == 1.0


def test_an_evaluation_run_of_rankings_uses_the_count_scale() -> None:
    from permrank.core.types import Candidate, Query, Ranking

    ranking = Ranking(
        query=Query(qid="q", text="t"),
        candidates=[Candidate(docid=d, text=d) for d in ("b", "a", "c")],
    )
    assert run_of([ranking]) == {"q": {"b": 3.0, "a": 2.0, "c": 1.0}}
