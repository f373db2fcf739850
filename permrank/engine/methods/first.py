"""Single-token listwise (FIRST, Reddy et al. 2024): one request per window with
``max_tokens=1``; the window is ordered by the logprobs of its identifiers as the first answer
token. A drop-in for the generated permutation inside any strategy: the strategy plans the same
windows, only how one window is answered changes.

Passages are labelled with letters (``[A]`` ... ``[Z]``), one token in every tokenizer we know;
a window of more than 26 passages, or an answer whose first token's alternatives hold no
identifier (a model that opens with ``"["`` or prose), is answered by generating the whole
permutation with the pipeline's template instead. Identifiers the server did not list (beyond
``top_logprobs``) follow the listed ones in the order they were shown; the trace counts them as
``missing``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from permrank.core.logprobs import answer_position, merged_logprob
from permrank.core.prompts import as_data
from permrank.core.types import Ranking, RepairReport, Request, WindowTrace
from permrank.engine.methods.base import (
    Route,
    answer_text,
    ask_tokens,
    check_choice,
    cut,
    trace_of,
)

if TYPE_CHECKING:
    from permrank.engine.pipeline import Pipeline

LETTERS = string.ascii_uppercase
FIRST_PROMPT = (
    "I will provide you with {num} passages, each indicated by an alphabetical identifier []. "
    "Rank the passages based on their relevance to the search query: {query}.\n\n{passages}\n\n"
    "Search Query: {query}.\nRank the {num} passages above based on their relevance to the "
    "search query. All the passages should be included and listed using identifiers, in "
    "descending order of relevance. The output format should be C > A > B. Only respond with "
    "the ranking results, do not say any word or explain."
)
COMPLETION_SUFFIX = "\nRanking:"


def order_by_logprobs(top: list[tuple[str, float]], labels: list[str]) -> tuple[list[int], int]:
    """Window positions ordered by their label's logprob (ties and unlisted ones keep the shown
    order, unlisted last), and how many labels were not listed."""
    values = [merged_logprob(top, label.casefold()) for label in labels]
    listed = sorted((i for i, v in enumerate(values) if v is not None), key=lambda i: -values[i])  # type: ignore[operator]
    missing = [i for i, v in enumerate(values) if v is None]
    return listed + missing, len(missing)


@dataclass(frozen=True)
class First:
    top_logprobs: int = 20
    route: Route = "chat"
    prompt: str = FIRST_PROMPT
    name: str = "first"

    def __post_init__(self) -> None:
        check_choice(self.route, ("chat", "completions"), "route")

    def render(
        self, pipeline: Pipeline, request: Request, window: list[int], labels: list[str]
    ) -> str:
        """The window's prompt, passages cut to the budget and, if the whole would not fit the
        context, each to an equal share of it."""
        limit = pipeline.budget.max_passage_tokens
        count = pipeline.tokenizer.count
        shown = [request.candidates[i] for i in window]
        while True:
            passages = "\n".join(
                f"[{label}] {cut(pipeline, c.text, c.title, limit)}"
                for label, c in zip(labels, shown, strict=True)
            )
            text = self.prompt.format(
                num=len(window), query=as_data(request.query.text), passages=passages
            )
            over = count(text) + 1 - pipeline.budget.context_window
            if over <= 0 or limit <= 8:
                return text
            limit = max(8, limit - over // len(window) - 1)

    async def ask(
        self, pipeline: Pipeline, request: Request, window: list[int], round_index: int
    ) -> tuple[list[int], WindowTrace | list[WindowTrace]]:
        from permrank.engine.pipeline import ask_window, off_loop

        if len(window) > len(LETTERS):
            return await ask_window(pipeline, request, window, round_index)
        labels = list(LETTERS[: len(window)])
        text = await off_loop(pipeline, self.render, pipeline, request, window, labels)
        c, tokens = await ask_tokens(
            pipeline,
            self.name,
            self.route,
            text,
            max_tokens=1,
            top_logprobs=self.top_logprobs,
            completion_suffix=COMPLETION_SUFFIX,
        )
        wanted = {label.casefold() for label in labels}
        position = answer_position(tokens, lambda word: word in wanted)
        docids = [request.candidates[i].docid for i in window]
        if position is None:  # no identifier among the first token's alternatives: generate
            failed = trace_of(
                c,
                round_index=round_index,
                docids=docids,
                answer=answer_text(c),
                permutation=list(range(len(window))),
                repair=RepairReport(ok=False, wrong_format=True),
            )
            order, trace = await ask_window(pipeline, request, window, round_index)
            return order, [failed, trace]
        top = position.top or [(position.token, position.logprob or 0.0)]
        permutation, missing = order_by_logprobs(top, labels)
        trace = trace_of(
            c,
            round_index=round_index,
            docids=docids,
            answer=answer_text(c),
            permutation=permutation,
            repair=RepairReport(ok=missing == 0, missing=missing),
        )
        return [window[p] for p in permutation], trace

    async def rerank(self, pipeline: Pipeline, request: Request) -> Ranking:
        from permrank.engine.pipeline import drive_strategy

        return await drive_strategy(pipeline, request, self.ask)

    def describe(self) -> dict[str, Any]:
        return dict(vars(self))
