"""Top-down partitioning around a pivot (TDPart; Parry, MacAvaney and Ganguly, 2024).

With ``window_size`` w and ``top_n`` k (< w), over the first ``top_k`` (m) candidates:

1. **Pivot.** The first w candidates are ranked in one window. Its k-th best is the *pivot*; its
   best k (the pivot included) stay *candidates*, the others are dropped.
2. **Partition.** Every other candidate is asked in one round of parallel windows, each holding
   the pivot first, the *guard* second (the pivot window's (k+1)-th, ``guard``, on by default
   for windows of 4 or more) and up to ``w - 2`` others (``w - 1`` without a guard). The best k
   of those placed above the pivot join the candidates; the rest are dropped. The guard is only
   a marker: it is never a candidate for being placed above the pivot. If any candidate beat
   the pivot, the pivot is dropped too.
3. If none beat the pivot, the pivot window's order is final (two rounds in all), unless a
   partition window placed exactly one passage between the pivot and the guard (see near
   misses). If at most w candidates remain, one final window orders them (three rounds). If
   more remain, they form ordered *chains* (the pivot window's best k - 1, and the best of each
   partition window). With ``pair_finish`` (the default, when ``2k <= w`` and there are at most
   8 chains) one round of windows in which every two chains meet (whole chains packed greedily,
   at most w candidates a window) orders them all by the number of the others each beat (a
   Copeland count, as in the tournament): three rounds at most, at the price of more windows.
   Otherwise steps 1-2 repeat on the candidates (two more rounds each time, fewer windows).

**Near misses** (``fill_final``, on by default). A final window shorter than w is topped up,
at no cost in rounds or windows, with the candidates that only just missed: those placed
between the pivot and the guard (the first of each window, then the second...), the beaten
pivot, then the first passage placed below the guard in each partition window where the guard
follows the pivot directly (below the pivot in each window, without a guard). A perfect judge
needs none of them. A noisy judge that swaps adjacent passages loses a true top-k passage
exactly there, because the pivot stands near the k-th place by design, and a swap can cascade:
a passage that slips past the pivot may slip past the next one too. The guard tells the slips
apart from the passages that belong below the pivot: a passage between pivot and guard is
either a slip or as good as they are, and where nothing stands between them the passage right
below the guard catches a two-place slip. When nobody beat the pivot but one partition window
holds exactly one passage between pivot and guard (the mark of one adjacent swap across the
pivot, where a block of them is more likely their true place), a final window asks the pivot
window's best k again with the near misses: in the third round that other queries take anyway.

Measured with ``bench/bench_tdpart_noise.py`` (in process, BM25 top-100, the simulator's judge
with random adjacent swaps, mean of 30 noise seeds; sliding: 9 rounds, 198 passage slots a
query counting 2 for each window's instruction): with swaps p = 0.3, tdpart is 0.0020 (DL19)
and 0.0026 (DL20) below the sliding window's nDCG@10 in 2.94 rounds, for 0.78x and 0.75x its
passages and 0.79x and 0.75x its real prompt tokens (rankgpt prompts); without the guard
(``guard=False``, the former default) it was 0.0067 and 0.0074 below in 2.96 rounds, for 0.76x
and 0.73x the passages. With p = 0.1: 0.0001 and 0.0005 below (0.0010 and 0.0016 without
the guard). The guard costs one passage a partition window (5 for the top-10 of 100).

Dropped candidates follow the candidates: those dropped later first, and within a round those
with fewer known-better candidates first; candidates beyond ``top_k`` keep their input order.

**Why the true top-k of a perfect judge ends in the top-k.** The pivot has k - 1 candidates above
it in its window. A candidate that the pivot beats therefore has at least k better ones and is
not in the true top-k; a candidate dropped from the pivot window has the k candidates above it.
A candidate placed k-th or lower in a partition window has k better ones there; the pivot, once
beaten, has k - 1 better ones in its window and one more. The guard changes none of this: it is
only looked up, never kept for being above the pivot. So every true top-k candidate stays a
candidate, and the final window (or the pivot window, when nobody beat the pivot) puts them in
true order at the head; the near misses, all beaten by the pivot, follow them. Each repetition
of steps 1-2 drops at least ``w - k`` candidates, so the plan ends for any n, w and k < w.

**Rounds and cost.** For the top-10 of 100 with windows of 20: the pivot window (20 passages),
5 partition windows (80 passages + 5 pivots + 5 guards) and a final window of at most 20: 3
rounds and 7 windows, about 126 passages shown (a perfect judge, a decent first stage) against
the sliding window's 9 rounds and 180. The pivot is the k-th of the *first-stage* head, so when
the first stage is weak many candidates beat it: the pair round then keeps 3 rounds but shows
more passages (about 315 when the input order is random), and ``pair_finish=False`` shows fewer
(about 185) in more rounds (5.6 on average).
"""

from __future__ import annotations

from dataclasses import dataclass

from permrank.core.strategies.base import Plan, check_answer
from permrank.core.strategies.common import (
    cover_pairs,
    depth_of,
    rank_dropped,
    split_evenly,
    validate_top_n,
)
from permrank.core.strategies.tournament import copeland_order, interleave

MAX_PAIR_CHAINS = 8
"""More chains than this repeat the pivot step instead: their pair round would take too many
windows (w = 20, k = 10 makes at most 6 chains from 100 candidates)."""

MIN_GUARDED_WINDOW = 4
"""Smaller windows get no guard: it would take a third or more of each partition window."""


@dataclass(frozen=True)
class TopDownPartition:
    window_size: int = 20
    top_n: int = 10
    top_k: int | None = None
    pair_finish: bool = True
    fill_final: bool = True
    guard: bool = True
    name: str = "tdpart"

    def __post_init__(self) -> None:
        validate_top_n(self.top_n, self.window_size, self.top_k)

    def plan(self, n: int) -> Plan:
        m = depth_of(n, self.top_k)
        rest = list(range(m, n))
        w, k = self.window_size, self.top_n
        candidates = list(range(m))
        dropped: list[list[tuple[int, int]]] = []
        while len(candidates) > w:
            head, others = candidates[:w], candidates[w:]
            (ranked,) = yield [head]
            check_answer(head, ranked)
            pivot = ranked[k - 1]
            guard = ranked[k] if self.guard and w >= MIN_GUARDED_WINDOW else None
            markers = [pivot] if guard is None else [pivot, guard]
            level = [(place, c) for place, c in enumerate(ranked) if place >= k]
            size = w - len(markers)
            windows = [[*markers, *part] for part in split_evenly(others, -(-len(others) // size))]
            answers = yield windows
            above: list[list[int]] = []  # of each window, its best k of those above the pivot
            between: list[list[int]] = []  # of each window, those between the pivot and the guard
            under: list[list[int]] = []  # of each window, the first under the guard (or pivot)
            for window, answer in zip(windows, answers, strict=True):
                check_answer(window, answer)
                marked = list(answer)
                answer = [c for c in marked if c != guard]  # the guard is only a marker
                cut = answer.index(pivot)
                above.append(answer[: min(cut, k)])
                level.extend((place, c) for place, c in enumerate(answer[k:cut], start=k))
                level.extend((k + place, c) for place, c in enumerate(answer[cut + 1 :]))
                if cut < k:
                    low = marked.index(pivot)
                    if guard is not None:
                        high, low = low, max(low, marked.index(guard))
                        between.append(marked[high + 1 : low])
                    if guard is None or not between[-1]:  # a slip past both shows right below
                        under.append(marked[low + 1 : low + 2])
            # near misses, for a final window's room: those between the pivot and the guard, the
            # pivot (beaten), then the first under the guard (or the pivot) of each window where
            # nothing stands between them
            near_misses = [*interleave(between), pivot, *interleave(under)]
            if not any(above):  # nobody beat the pivot: the pivot window's order is final...
                lone = any(len(caught) == 1 for caught in between)
                if not (self.fill_final and lone):
                    dropped.append(level)
                    return list(ranked[:k]) + rank_dropped(dropped) + rest
                # ...unless a passage stands alone between the pivot and the guard: the mark of
                # one adjacent swap across the pivot. A final window then asks again.
                candidates = list(dict.fromkeys([*ranked[:k], *near_misses]))[:w]
            else:
                level.append((k, pivot))  # beaten by k - 1 in its window and by those above it
                chains = [chain for chain in [list(ranked[: k - 1]), *above] if chain]
                candidates = [c for chain in chains for c in chain]
                if self.fill_final and len(candidates) < w:
                    candidates += near_misses[: w - len(candidates)]  # all distinct
                pair_round = self.pair_finish and 2 * k <= w and len(chains) <= MAX_PAIR_CHAINS
                if len(candidates) > w and pair_round:
                    dropped.append(level)
                    pairs = cover_pairs(chains, w)
                    answers = yield pairs
                    for window, answer in zip(pairs, answers, strict=True):
                        check_answer(window, answer)
                    return copeland_order(candidates, answers) + rank_dropped(dropped) + rest
            taken = set(candidates)
            dropped.append([(place, c) for place, c in level if c not in taken])
        if len(candidates) > 1:
            (final,) = yield [candidates]
            check_answer(candidates, final)
            candidates = list(final)
        return candidates + rank_dropped(dropped) + rest
