"""Small pure helpers shared by the parallel strategies."""

from __future__ import annotations

from permrank.core.errors import ConfigError
from permrank.core.strategies.base import Window
from permrank.core.strategies.sliding import validate_top_k


def split_evenly(items: list[int], parts: int) -> list[Window]:
    """``items`` cut into ``parts`` consecutive runs whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        runs.append(items[start:end])
        start = end
    return [run for run in runs if run]


def rank_dropped(levels: list[list[tuple[int, int]]]) -> list[int]:
    """The order of the candidates a strategy let go, best first.

    ``levels`` holds, for each round, ``(place, candidate)`` pairs: ``place`` is how many
    candidates of its window were known to be better. A later round's candidates survived longer
    and come first; within a round, fewer known-better candidates come first (stable).
    """
    order: list[int] = []
    for level in reversed(levels):
        order.extend(candidate for _, candidate in sorted(level, key=lambda pair: pair[0]))
    return order


def validate_top_n(top_n: int, window_size: int, top_k: int | None) -> None:
    """Refuse a ``top_n`` that no round could honour, and a ``top_k`` below 1."""
    validate_top_k(top_k)
    if top_n < 1:
        raise ConfigError(
            f"top_n must be at least 1 (got {top_n}): it is how many leading "
            "places the strategy settles, e.g. --top-n 10 for nDCG@10."
        )
    if top_n >= window_size:
        raise ConfigError(
            f"top_n ({top_n}) must be smaller than window_size ({window_size}): a window must "
            "hold more candidates than it keeps, or no round can drop one. Use a larger "
            "--window-size or a smaller --top-n, or the sliding strategy."
        )


def depth_of(n: int, top_k: int | None) -> int:
    """How many leading candidates are reranked (``top_k`` limits it; the rest keep order)."""
    return n if top_k is None else min(top_k, n)


def cover_pairs(chains: list[list[int]], window_size: int) -> list[Window]:
    """Windows, each a union of whole chains of at most ``window_size`` candidates, such that
    every two chains share at least one window (so every two candidates have been compared).

    Greedy: a window starts with the longest pair of chains not yet together and takes in the
    chains that would meet the most chains they have not met, while they fit. Any two chains
    must fit in one window.
    """
    apart = {(a, b) for a in range(len(chains)) for b in range(a + 1, len(chains))}
    windows: list[Window] = []
    while apart:
        first = max(apart, key=lambda pair: len(chains[pair[0]]) + len(chains[pair[1]]))
        members = list(first)
        size = sum(len(chains[i]) for i in members)
        while True:
            gains = {
                i: sum(1 for j in members if (min(i, j), max(i, j)) in apart)
                for i in range(len(chains))
                if i not in members and size + len(chains[i]) <= window_size
            }
            fitting = [i for i, gain in gains.items() if gain]
            if not fitting:
                break
            best = max(fitting, key=lambda i: (gains[i], -len(chains[i])))
            members.append(best)
            size += len(chains[best])
        members.sort()
        apart -= {(a, b) for a in members for b in members if a < b}
        windows.append([c for i in members for c in chains[i]])
    return windows
