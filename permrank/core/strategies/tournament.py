"""The tournament: windows of one round are independent and asked together; the best advance.

With ``window_size`` w and ``top_n`` k (< w), over the first ``top_k`` (m) candidates:

1. **Heats.** The m candidates are cut into ``ceil(m / w)`` windows of nearly equal size (at most
   w each). Each window keeps its best k, in the order the judge gave: a *chain*.
2. **Merges** (when ``2k <= w``). Whole chains are packed, in order, into windows of at most w
   (two chains of k per window when ``2k = w``); each window keeps its best k as one chain. A
   chain left alone waits for the next round without being asked again.
3. **Final.** As soon as the survivors fit in one window, that window orders them. When they do
   not but at most three chains remain, one round of windows asks every *pair* of chains
   together (three windows at most); each candidate is then placed by the number of the others it
   beat (a Copeland count), which for a consistent judge is exactly its rank among them.

Candidates that drop out follow the survivors: those that lasted longer first, and within a
round those with fewer known-better candidates first; candidates beyond ``top_k`` keep their
input order after all of them.

**Why the true top-k of a perfect judge ends in the top-k.** A window drops a candidate only when
k candidates of that same window beat it. A candidate that k others beat is not in the true
top-k, so every true top-k candidate survives every round. In the final step every pair of
survivors has shared a window, so their order is the true order and the true top-k lead it. This
holds for any n, w and k < w; the windows never hold more than w candidates.

**Rounds.** Every round lowers the number of chains (a window of two chains or more becomes one)
or, in the heats, the number of candidates (a window larger than k drops some). For the top-10 of
100 with windows of 20: 5 heats keep 50 (round 1), 2 merges and a waiting chain leave 3 chains
(round 2), the 3 pair windows order the last 30 (round 3): 3 rounds, 10 windows. In general
``1 + ceil(log2(ceil(m / w) / 3)) + 1`` rounds at most when ``2k <= w``.

**When k > w/2** two chains no longer fit in one window, so there are no merges: every round cuts
the survivors (interleaved across chains) into full windows of w and keeps k of each, which drops
only ``w - k`` per window; the rounds grow like ``log(m / w) / log(w / k)``. Choose
``window_size >= 2 * top_n`` to keep the round count small.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

from permrank.core.strategies.base import Plan, Window, check_answer
from permrank.core.strategies.common import (
    cover_pairs,
    depth_of,
    rank_dropped,
    split_evenly,
    validate_top_n,
)


def copeland_order(candidates: list[int], answers: list[Window]) -> list[int]:
    """``candidates`` by how many of the others each beat in ``answers`` (ties: given order).

    A pair asked several times counts once, for the side that won it more often (half each on a
    tie). With a consistent judge this is the true order of the candidates.
    """
    wins_over: dict[tuple[int, int], int] = {}
    for answer in answers:
        for place, better in enumerate(answer):
            for worse in answer[place + 1 :]:
                wins_over[better, worse] = wins_over.get((better, worse), 0) + 1
    score = dict.fromkeys(candidates, 0.0)
    for (better, worse), count in wins_over.items():
        against = wins_over.get((worse, better), 0)
        if count > against:
            score[better] += 1.0
        elif count == against:
            score[better] += 0.5
    position = {c: i for i, c in enumerate(candidates)}
    return sorted(candidates, key=lambda c: (-score[c], position[c]))


def pack_chains(chains: list[list[int]], window_size: int) -> list[list[list[int]]]:
    """Consecutive chains grouped so that each group holds at most ``window_size`` candidates."""
    groups: list[list[list[int]]] = []
    size = window_size + 1
    for chain in chains:
        if size + len(chain) > window_size:
            groups.append([])
            size = 0
        groups[-1].append(chain)
        size += len(chain)
    return groups


def interleave(chains: list[list[int]]) -> list[int]:
    """The chains' candidates round-robin by rank: every chain's first, then every second, ..."""
    return [c for rank in zip_longest(*chains) for c in rank if c is not None]


@dataclass(frozen=True)
class Tournament:
    window_size: int = 20
    top_n: int = 10
    top_k: int | None = None
    name: str = "tournament"

    def __post_init__(self) -> None:
        validate_top_n(self.top_n, self.window_size, self.top_k)

    def plan(self, n: int) -> Plan:
        m = depth_of(n, self.top_k)
        rest = list(range(m, n))
        w, k = self.window_size, self.top_n
        chains = [[i] for i in range(m)]
        dropped: list[list[tuple[int, int]]] = []
        while True:
            survivors = [c for chain in chains for c in chain]
            if len(chains) <= 1:
                return survivors + rank_dropped(dropped) + rest
            if len(survivors) <= w:
                (answer,) = yield [survivors]
                check_answer(survivors, answer)
                return list(answer) + rank_dropped(dropped) + rest
            longest = sorted(len(chain) for chain in chains)[-2:]
            if len(chains) <= 3 and sum(longest) <= w and max(longest) > 1:
                pairs = cover_pairs(chains, w)
                answers = yield pairs
                for window, answer in zip(pairs, answers, strict=True):
                    check_answer(window, answer)
                return copeland_order(survivors, answers) + rank_dropped(dropped) + rest
            groups = self._windows(chains)
            asked = [g for g in groups if len(g) > 1]
            replies = iter((yield [[c for chain in g for c in chain] for g in asked]))
            chains = []
            level: list[tuple[int, int]] = []
            for group in groups:
                if len(group) == 1:  # a chain alone waits: it is already in order
                    chains.append(group[0])
                    continue
                window = [c for chain in group for c in chain]
                answer = next(replies)
                check_answer(window, answer)
                chains.append(list(answer[:k]))
                level.extend((place, c) for place, c in enumerate(answer) if place >= k)
            dropped.append(level)

    def _windows(self, chains: list[list[int]]) -> list[list[list[int]]]:
        """This round's windows, each a group of chains (a group of one is not asked)."""
        w, k = self.window_size, self.top_n
        if all(len(chain) == 1 for chain in chains):  # heats: even windows of singletons
            survivors = [chain[0] for chain in chains]
            parts = -(-len(survivors) // w)
            if 2 * k > w:  # full windows, so that each drops w - k
                runs = [survivors[i : i + w] for i in range(0, len(survivors), w)]
            else:
                runs = split_evenly(survivors, parts)
            return [[[c] for c in run] for run in runs]
        if 2 * k <= w:
            return pack_chains(chains, w)
        survivors = interleave(chains)
        return [[[c] for c in survivors[i : i + w]] for i in range(0, len(survivors), w)]
