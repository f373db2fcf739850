"""The sliding window (RankGPT): back to front, overlapping windows, like one bubble-sort pass.

With ``window_size`` w and ``step`` s over the first ``top_k`` (m) candidates, a pass asks the
windows ``[max(0, e - w), e)`` for ``e = m, m - s, m - 2s, ...`` and stops after the window that
starts at rank 1. Unlike RankGPT's own loop it never skips the head when ``m - w`` is not a
multiple of ``s``. 100 candidates with 20/10 are exactly 9 windows per pass; ``m <= w`` is one
window. A perfect judge and one pass put the true top ``w - s`` of the m candidates at the top.

Each window depends on the one before it, so every batch holds one window: a pass costs as many
sequential rounds as windows. ``early_stop`` ends the passes as soon as one leaves the top
``w - s`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from permrank.core.errors import ConfigError
from permrank.core.strategies.base import Plan, check_answer


def window_bounds(m: int, window_size: int, step: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each window of one pass over ``m`` candidates, in asking order."""
    if m <= 0:
        return []
    bounds = []
    end = m
    while True:
        start = max(0, end - window_size)
        bounds.append((start, end))
        if start == 0:
            return bounds
        end -= step


def validate_window(window_size: int, step: int) -> None:
    if window_size < 2:
        raise ConfigError(
            f"window_size must be at least 2 (got {window_size}): a window of one passage "
            "cannot be ranked. Use --window-size 20 (the default) or another value >= 2."
        )
    if step <= 0:
        raise ConfigError(
            f"step must be at least 1 (got {step}): the window would never move. "
            "Use --step 10 (the default) or a value between 1 and the window size."
        )
    if step > window_size:
        raise ConfigError(
            f"step ({step}) is larger than window_size ({window_size}): candidates between "
            "windows would never be compared. Use a step <= the window size."
        )


def validate_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ConfigError(
            f"top_k must be at least 1 (got {top_k}); leave it out to rerank every candidate."
        )


@dataclass(frozen=True)
class SlidingWindow:
    window_size: int = 20
    step: int = 10
    passes: int = 1
    top_k: int | None = None
    early_stop: bool = False
    name: str = "sliding"

    def __post_init__(self) -> None:
        validate_window(self.window_size, self.step)
        validate_top_k(self.top_k)
        if self.passes < 1:
            raise ConfigError(f"passes must be at least 1 (got {self.passes}).")

    def plan(self, n: int) -> Plan:
        order = list(range(n))
        m = n if self.top_k is None else min(self.top_k, n)
        if m < 2:  # nothing to compare
            return order
        bounds = window_bounds(m, self.window_size, self.step)
        keep = max(1, self.window_size - self.step)
        for _ in range(self.passes):
            head_before = order[:keep]
            for start, end in bounds:
                if end - start < 2:  # a lone passage has nothing to be compared with
                    continue
                window = order[start:end]
                (answer,) = yield [window]
                check_answer(window, answer)
                order[start:end] = answer
            if self.early_stop and order[:keep] == head_before:
                break
        return order
