"""The strategy protocol: a pure generator that plans windows and merges their answers.

A strategy's ``plan(n)`` is a generator. It yields a *batch* of windows, each a list of candidate
indices (into the input order ``0..n-1``) in the order they are to be shown; it is sent back, for
each window of the batch, the same indices reordered most relevant first; when done it returns
the final order of all ``n`` indices. Windows of one batch are independent and may be asked in
parallel; batches are sequential rounds.

Nothing here knows of prompts, tokens or HTTP: ``run_plan`` drives a plan with a plain Python
function as the judge, which is how strategies are tested.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Protocol

Window = list[int]
Plan = Generator[list[Window], list[Window], list[int]]


class Strategy(Protocol):
    name: str

    def plan(self, n: int) -> Plan: ...


def run_plan(plan: Plan, judge: Callable[[Window], Sequence[int]]) -> tuple[list[int], int]:
    """Drive ``plan`` to the end with ``judge``; return the final order and the rounds asked."""
    rounds = 0
    try:
        batch = next(plan)
        while True:
            rounds += 1
            batch = plan.send([list(judge(list(window))) for window in batch])
    except StopIteration as stop:
        return list(stop.value), rounds


def check_answer(window: Window, answer: Sequence[int]) -> None:
    """Refuse an answer that is not a reordering of its window (a driver bug, never input)."""
    if sorted(answer) != sorted(window):
        raise ValueError(f"answer {list(answer)} is not a permutation of window {window}")
