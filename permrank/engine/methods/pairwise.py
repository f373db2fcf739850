"""Pairwise ranking prompting (PRP, Qin et al. 2024): "which passage is more relevant, A or B?"

Each comparison is asked in both orders (A/B and B/A) and scored from the logprobs of the answer
token ("A" or "B", also inside "Passage A"): P(i beats j) is the mean of P(A) when i is shown
first and P(B) when it is shown second, which cancels the model's bias for a position.

How the comparisons are chosen and merged is a pure generator, like a strategy's plan: it yields
a batch of pairs ``(i, j)``, is sent P(i beats j) for each, and returns the order. Three ship:
- ``allpairs``: every pair of the first ``top_k`` candidates in one batch (m(m-1)/2 comparisons,
  one round); a candidate's score is its summed preference probability.
- ``sliding``: ``top_n`` (PRP's ``k``) bubble-sort passes from the bottom (PRP-Sliding-K),
  one comparison a round.
- ``heap``: a bounded heap of the best ``top_n`` seen, then sorted: O(m log k) comparisons.
A preference of exactly 0.5 keeps the first-stage order. The driver never asks a pair twice.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from permrank.core.errors import ConfigError
from permrank.core.logprobs import answer_position, floor_logprob, merged_logprob
from permrank.core.types import Ranking, RepairReport, Request, WindowTrace
from permrank.engine.methods.base import (
    Route,
    answer_text,
    ask_tokens,
    check_choice,
    check_top_k,
    fill_prompt,
    ranking_of,
    trace_of,
)
from permrank.engine.pipeline import all_or_none

if TYPE_CHECKING:
    from permrank.engine.pipeline import Pipeline

Pair = tuple[int, int]
PairPlan = Generator[list[Pair], list[float], list[int]]

PRP_PROMPT = (
    'Given a query "{query}", which of the following two passages is more relevant to the '
    'query?\n\nPassage A: "{passage_a}"\n\nPassage B: "{passage_b}"\n\n'
    "Output Passage A or Passage B:"
)
AGGREGATIONS = ("allpairs", "sliding", "heap")


def beats(first: int, second: int, preference: float) -> bool:
    """``first`` is placed above ``second``; an exact tie keeps the first-stage order."""
    return preference > 0.5 or (preference == 0.5 and first < second)


def allpairs_plan(m: int) -> PairPlan:
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    preferences = yield pairs
    won: list[list[float]] = [[] for _ in range(m)]
    for (i, j), p in zip(pairs, preferences, strict=True):
        won[i].append(p)
        won[j].append(1.0 - p)
    # Scores equal to 9 decimals are ties (1 - (1 - p) is not always p in floating point).
    score = [round(math.fsum(w), 9) for w in won]
    return sorted(range(m), key=lambda i: (-score[i], i))


def sliding_plan(m: int, k: int) -> PairPlan:
    order = list(range(m))
    for top in range(min(k, m - 1)):
        for pos in range(m - 1, top, -1):
            above, below = order[pos - 1], order[pos]
            (p,) = yield [(below, above)]
            if beats(below, above, p):
                order[pos - 1], order[pos] = below, above
    return order


def _better(x: int, y: int) -> Generator[list[Pair], list[float], bool]:
    (p,) = yield [(x, y)]
    return beats(x, y, p)


def _sift_down(heap: list[int], i: int) -> Generator[list[Pair], list[float], None]:
    """Restore a min-heap (root = the weakest) below position ``i``."""
    while True:
        weakest = i
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap) and (yield from _better(heap[weakest], heap[child])):
                weakest = child
        if weakest == i:
            return
        heap[i], heap[weakest] = heap[weakest], heap[i]
        i = weakest


def heap_plan(m: int, k: int) -> PairPlan:
    heap = list(range(min(k, m)))
    for i in reversed(range(len(heap) // 2)):
        yield from _sift_down(heap, i)
    for x in range(len(heap), m):
        if (yield from _better(x, heap[0])):
            heap[0] = x
            yield from _sift_down(heap, 0)
    ranked: list[int] = []
    while heap:  # pop the weakest until empty: weakest first
        heap[0], heap[-1] = heap[-1], heap[0]
        ranked.append(heap.pop())
        yield from _sift_down(heap, 0)
    top = ranked[::-1]
    chosen = set(top)
    return top + [i for i in range(m) if i not in chosen]


def pair_plan(aggregation: str, m: int, k: int) -> PairPlan:
    if aggregation == "allpairs":
        return allpairs_plan(m)
    if aggregation == "sliding":
        return sliding_plan(m, k)
    return heap_plan(m, k)


async def drive_pairs(
    plan: PairPlan, prefer: Callable[[int, int, int], Awaitable[float]]
) -> tuple[list[int], int]:
    """Run ``plan`` with ``prefer(i, j, round) -> P(i beats j)``; each pair is asked once (its
    reverse is ``1 - p``); the final order and the rounds asked."""
    known: dict[Pair, float] = {}
    rounds = 0
    try:
        batch = next(plan)
        while True:
            new = list(dict.fromkeys(p for p in batch if p not in known and p[::-1] not in known))
            if new:
                answers = await all_or_none(prefer(i, j, rounds) for i, j in new)
                known.update(zip(new, answers, strict=True))
                rounds += 1
            batch = plan.send([known[p] if p in known else 1.0 - known[p[::-1]] for p in batch])
    except StopIteration as stop:
        return list(stop.value), rounds


def run_pair_plan(plan: PairPlan, prefer: Callable[[int, int], float]) -> tuple[list[int], int]:
    """Drive ``plan`` with a plain function (how plans are tested); order and comparisons."""
    asked = 0

    async def ask(i: int, j: int, round_index: int) -> float:
        nonlocal asked
        asked += 1
        return prefer(i, j)

    order, _ = asyncio.run(drive_pairs(plan, ask))
    return order, asked


def first_shown_probability(top: list[tuple[str, float]]) -> float:
    floor = floor_logprob(top)
    a = merged_logprob(top, "a")
    b = merged_logprob(top, "b")
    a = floor if a is None else a
    b = floor if b is None else b
    return 1.0 / (1.0 + math.exp(b - a))


@dataclass(frozen=True)
class Pairwise:
    aggregation: str = "heap"
    top_n: int = 10
    """Places guaranteed at the top: how many of them sliding and heap sort (allpairs orders
    all); the strategies' ``top_n``. ``k`` (PRP's name, the CLI's ``--pairwise-k``) is an
    alias."""
    both_orders: bool = True
    top_logprobs: int = 5
    max_tokens: int = 4
    route: Route = "chat"
    prompt: str = PRP_PROMPT
    top_k: int | None = None
    """Compare only the first ``top_k`` candidates; the rest follow in input order."""
    name: str = "pairwise"
    k: int | None = None
    """The older name of ``top_n``."""

    def __post_init__(self) -> None:
        if self.k is not None:
            if self.k < 1:
                raise ConfigError(f"k must be at least 1 (got {self.k}; k is top_n's older name)")
            if self.top_n not in (10, self.k):
                raise ConfigError(
                    f"pairwise: top_n={self.top_n} and k={self.k} disagree; k is top_n's older "
                    "name, give one of them"
                )
            object.__setattr__(self, "top_n", self.k)
            object.__setattr__(self, "k", None)
        check_choice(self.aggregation, AGGREGATIONS, "aggregation")
        check_choice(self.route, ("chat", "completions"), "route")
        check_top_k(self.top_k)
        if self.top_n < 1:
            raise ConfigError(f"top_n (pairwise k) must be at least 1 (got {self.top_n})")

    async def _ask(
        self, pipeline: Pipeline, request: Request, a: int, b: int, round_index: int
    ) -> tuple[float, WindowTrace]:
        """P(passage ``a``, shown as A, beats passage ``b``, shown as B)."""
        ca, cb = request.candidates[a], request.candidates[b]
        text = fill_prompt(self.prompt, pipeline, request.query, passage_a=ca, passage_b=cb)
        c, tokens = await ask_tokens(
            pipeline,
            self.name,
            self.route,
            text,
            max_tokens=self.max_tokens,
            top_logprobs=self.top_logprobs,
        )
        position = answer_position(tokens, lambda word: word in ("a", "b"))
        if position is None:
            p, repair = 0.5, RepairReport(ok=False, wrong_format=True)
        else:
            top = position.top or [(position.token, position.logprob or 0.0)]
            p, repair = first_shown_probability(top), RepairReport()
        return p, trace_of(
            c,
            round_index=round_index,
            docids=[ca.docid, cb.docid],
            answer=answer_text(c),
            permutation=[0, 1] if p >= 0.5 else [1, 0],
            repair=repair,
            score=p,
        )

    async def rerank(self, pipeline: Pipeline, request: Request) -> Ranking:
        started = time.perf_counter()
        trace: list[WindowTrace] = []
        n = len(request.candidates)
        m = n if self.top_k is None else min(self.top_k, n)

        async def prefer(i: int, j: int, round_index: int) -> float:
            asks = [self._ask(pipeline, request, i, j, round_index)]
            if self.both_orders:
                asks.append(self._ask(pipeline, request, j, i, round_index))
            answers = await all_or_none(asks)
            trace.extend(t for _, t in answers)
            if len(answers) == 1:
                return answers[0][0]
            return (answers[0][0] + 1.0 - answers[1][0]) / 2

        order, rounds = await drive_pairs(pair_plan(self.aggregation, m, self.top_n), prefer)
        return ranking_of(request, order + list(range(m, n)), trace, rounds, started)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "k"}
