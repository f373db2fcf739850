"""Scoring methods: every way an LLM can order candidates, behind one protocol.

``listwise`` (the default) is the generated permutation of ``permrank.engine.pipeline``; the others:

- ``pointwise``: "Does the passage answer the query? Yes/No" once per passage, scored from the
  first answer token's logprobs;
- ``likelihood``: the query after "Passage: ... write a question" (UPR), scored by the mean
  logprob of the query's tokens;
- ``first``: the listwise window with ``max_tokens=1``, ordered by the identifiers' logprobs;
- ``pairwise``: "Passage A or Passage B?" in both orders (PRP), from the answer's logprobs;
- ``score``: a learned relevance head's scores through the endpoint's rerank API (Cohere/Jina/
  vLLM ``/rerank``, TEI ``/rerank``, vLLM ``/score``).

A method is a value a user names: ``get_method("pairwise", aggregation="heap", k=10)``.
"""

from __future__ import annotations

from typing import Any

from permrank.core.logprobs import LogprobsUnavailable
from permrank.core.registry import build, check_options
from permrank.engine.methods.base import Method, PassageScorer
from permrank.engine.methods.first import First
from permrank.engine.methods.likelihood import Likelihood
from permrank.engine.methods.pairwise import Pairwise
from permrank.engine.methods.pointwise import Pointwise
from permrank.engine.methods.score import Score

METHODS: dict[str, type] = {
    "pointwise": Pointwise,
    "likelihood": Likelihood,
    "first": First,
    "pairwise": Pairwise,
    "score": Score,
}
METHOD_NAMES = ("listwise", *METHODS)
SHARED_OPTIONS = ("top_k",)
"""Options the Reranker passes to every method; a method that does not take one ignores it."""


def get_method(name: str, **options: Any) -> Method | None:
    """The method called ``name`` with ``options`` (``None`` for ``listwise``, the driver's own
    path). Options that are None are left at their defaults; an option the method does not take
    is refused, except the shared ones."""
    if name == "listwise":
        check_options("method", name, set(), options, SHARED_OPTIONS)
        return None
    method: Method = build(
        "method", METHODS, name, options, shared=SHARED_OPTIONS, known=METHOD_NAMES
    )
    return method


__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "First",
    "Likelihood",
    "LogprobsUnavailable",
    "Method",
    "Pairwise",
    "PassageScorer",
    "Pointwise",
    "Score",
    "get_method",
]
