"""Pointwise yes/no: one prompt per (query, passage), scored from the first answer token.

The score comes from the logprobs of the answer's first token (``max_tokens=1``), with every
variant of a word merged (``"Yes"``, ``" yes"``, ``"YES"`` ...):
- ``softmax`` (default): P(yes) / (P(yes) + P(no)), the probabilities of the variants summed;
- ``logprob``: the logprob of the most likely "yes" token alone (Nogueira et al.'s monoT5 uses
  the softmax; the raw logprob is what an API without "no" would give);
- ``vocab``: the summed probability of every "yes" variant over the whole vocabulary.
A word the server did not list is given the smallest listed logprob (an upper bound).

``labels="graded"`` asks for one of three relevance grades instead of yes/no (Zhuang et al.
2023, "Beyond Yes and No"): "Highly relevant", "Somewhat relevant", "Not relevant", and scores
the expected grade (2, 1, 0) under the first answer token's probabilities of the three words.
``interpolate`` fuses the score with the first-stage score (see ``likelihood.fuse``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from permrank.core.logprobs import best_logprob, floor_logprob, merged_logprob
from permrank.core.types import Candidate, Query, Ranking, Request, WindowTrace
from permrank.engine.methods.base import (
    Route,
    answer_text,
    ask_tokens,
    check_choice,
    check_top_k,
    fill_prompt,
    trace_of,
)
from permrank.engine.methods.likelihood import check_weight, rerank_fused

if TYPE_CHECKING:
    from permrank.engine.pipeline import Pipeline

YES_NO_PROMPT = (
    "Query: {query}\nPassage: {passage}\nDoes the passage answer the query? Answer 'Yes' or 'No'."
)
GRADED_PROMPT = (
    'For the following query and passage, judge whether they are "Highly relevant", '
    '"Somewhat relevant", or "Not relevant".\nQuery: {query}\nPassage: {passage}\n'
    "Answer with one of: Highly relevant, Somewhat relevant, Not relevant."
)
GRADES = {"highly": 2.0, "somewhat": 1.0, "not": 0.0}
COMPLETION_SUFFIX = "\nAnswer:"
NORMALISATIONS = ("softmax", "logprob", "vocab")
LABELS = ("yesno", "graded")


def graded_score(top: list[tuple[str, float]]) -> float:
    """The expected grade (0..2) under the listed probabilities of the grade words."""
    floor = floor_logprob(top)
    weights = {}
    for word, grade in GRADES.items():
        found = merged_logprob(top, word)
        weights[grade] = math.exp(floor if found is None else found)
    total = sum(weights.values())
    return sum(g * w for g, w in weights.items()) / total


def yes_no_score(top: list[tuple[str, float]], normalisation: str) -> float:
    """The relevance score of one answer token's alternatives (see the module docstring)."""
    floor = floor_logprob(top)
    if normalisation == "logprob":
        found = best_logprob(top, "yes")
        return floor if found is None else found
    yes = merged_logprob(top, "yes")
    yes = floor if yes is None else yes
    if normalisation == "vocab":
        return math.exp(yes)
    no = merged_logprob(top, "no")
    no = floor if no is None else no
    return 1.0 / (1.0 + math.exp(no - yes))


@dataclass(frozen=True)
class Pointwise:
    normalisation: str = "softmax"
    top_logprobs: int = 20
    route: Route = "chat"
    prompt: str | None = None
    top_k: int | None = None
    labels: str = "yesno"
    interpolate: float | None = None
    name: str = "pointwise"

    def __post_init__(self) -> None:
        check_choice(self.labels, LABELS, "labels")
        if self.prompt is None:
            default = GRADED_PROMPT if self.labels == "graded" else YES_NO_PROMPT
            object.__setattr__(self, "prompt", default)
        check_weight(self.interpolate)
        check_choice(self.normalisation, NORMALISATIONS, "normalisation")
        check_choice(self.route, ("chat", "completions"), "route")
        check_top_k(self.top_k)

    async def score(
        self, pipeline: Pipeline, query: Query, candidate: Candidate
    ) -> tuple[float, list[WindowTrace]]:
        text = fill_prompt(str(self.prompt), pipeline, query, passage=candidate)
        c, tokens = await ask_tokens(
            pipeline,
            self.name,
            self.route,
            text,
            max_tokens=1,
            top_logprobs=self.top_logprobs,
            completion_suffix=COMPLETION_SUFFIX,
        )
        first = tokens[0]
        top = first.top or ([(first.token, first.logprob)] if first.logprob is not None else [])
        if self.labels == "graded":
            score = graded_score(top)
        else:
            score = yes_no_score(top, self.normalisation)
        trace = trace_of(
            c,
            round_index=0,
            docids=[candidate.docid],
            answer=answer_text(c),
            permutation=[0],
            score=score,
        )
        return score, [trace]

    async def rerank(self, pipeline: Pipeline, request: Request) -> Ranking:
        return await rerank_fused(self, pipeline, request, self.interpolate)

    def describe(self) -> dict[str, Any]:
        return dict(vars(self))
