"""Permutation self-consistency (Tang et al., 2024) around any other strategy.

Models favour passages by where they stand in the prompt (often the first and the last). Here
every window the inner strategy plans is asked ``shuffles`` times, each time in a different
order (the first as planned, the others seeded shuffles), all in the same batch, so a round
costs no more sequential time. The answers are aggregated into one order per window, which is
what the inner strategy receives; a position bias then pulls in different directions and
cancels out. Calls and tokens grow ``shuffles`` times; rounds stay those of the inner strategy.

``aggregate`` names how the answers are combined:
- ``borda``: a candidate scores ``w - place`` in each answer; highest total first.
- ``kemeny``: a local Kemeny optimum: starting from the Borda order, adjacent candidates are
  swapped while a majority of the answers prefers the other order (local Kemenization, Dwork et
  al. 2001). The result disagrees with the answers on no more pairs than Borda's does.
Ties keep the window's planned order. Shuffles are seeded by ``seed`` and the window's
candidates, so a run is repeatable.

It wraps a strategy value, ``SelfConsistency(TopDownPartition(top_n=10), shuffles=3,
aggregate="kemeny")``. The older form names the inner strategy and copies its parameters,
``get_strategy("selfconsistency", inner="tournament", shuffles=3, top_n=10)`` (the CLI's
``--inner``): ``window_size``, ``step``, ``passes``, ``top_k``, ``top_n`` and ``early_stop`` then go
to the inner strategy. Either way ``inner`` is a strategy value once built, and those copied
fields show the inner strategy's values (for the manifest; see ``describe``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from permrank.core.errors import ConfigError
from permrank.core.strategies.base import Plan, Strategy, Window, check_answer

AGGREGATES = ("borda", "kemeny")


def borda(window: Window, answers: list[Window]) -> list[int]:
    """The window's candidates by Borda count over ``answers`` (ties keep window order)."""
    points = dict.fromkeys(window, 0)
    for answer in answers:
        for place, candidate in enumerate(answer):
            points[candidate] += len(answer) - place
    position = {c: i for i, c in enumerate(window)}
    return sorted(window, key=lambda c: (-points[c], position[c]))


def kemeny(window: Window, answers: list[Window]) -> list[int]:
    """A local Kemeny optimum over ``answers``, starting from their Borda order."""
    place = [{c: i for i, c in enumerate(answer)} for answer in answers]

    def prefer(a: int, b: int) -> int:
        """How many answers put ``a`` above ``b`` minus how many put ``b`` above ``a``."""
        return sum(1 if p[a] < p[b] else -1 for p in place)

    order = borda(window, answers)
    swapped = True
    while swapped:  # each swap removes a pair the majority disagrees with, so this ends
        swapped = False
        for i in range(len(order) - 1):
            if prefer(order[i + 1], order[i]) > 0:
                order[i], order[i + 1] = order[i + 1], order[i]
                swapped = True
    return order


def shuffled(window: Window, copy: int, seed: int) -> Window:
    """The ``copy``-th order of ``window`` to ask: the planned one first, then seeded shuffles."""
    if copy == 0:
        return list(window)
    order = list(window)
    random.Random(f"{seed}:{copy}:{','.join(map(str, window))}").shuffle(order)
    return order


INNER_FIELDS = ("window_size", "step", "passes", "top_k", "top_n", "early_stop")
"""The inner strategy's parameters the name-plus-fields form copies."""


@dataclass(frozen=True)
class SelfConsistency:
    inner: Strategy | str = "sliding"
    """The strategy whose windows are asked in several orders: a value, or a name (with the
    fields below as its parameters)."""
    shuffles: int = 3
    aggregate: Literal["borda", "kemeny"] = "borda"
    seed: int = 0
    window_size: int | None = None
    step: int | None = None
    passes: int | None = None
    top_k: int | None = None
    top_n: int | None = None
    early_stop: bool | None = None
    name: str = "selfconsistency"

    def __post_init__(self) -> None:
        if self.shuffles < 1:
            raise ConfigError(
                f"shuffles must be at least 1 (got {self.shuffles}): it is how many orders of "
                "each window are asked, e.g. --shuffles 3."
            )
        if self.aggregate not in AGGREGATES:
            raise ConfigError(
                f"aggregate must be one of {', '.join(AGGREGATES)} (got {self.aggregate!r})"
            )
        inner = self.inner
        if isinstance(inner, str):
            if inner == self.name:
                raise ConfigError(
                    "selfconsistency cannot wrap itself; name another --inner strategy"
                )
            from permrank.core.strategies import get_strategy

            # Refuses bad inner parameters now, not at the first query.
            inner = get_strategy(inner, **{f: getattr(self, f) for f in INNER_FIELDS})
        else:
            if isinstance(inner, SelfConsistency):
                raise ConfigError("selfconsistency cannot wrap itself; wrap another strategy")
            if not hasattr(inner, "plan"):
                raise ConfigError(
                    f"SelfConsistency wraps a strategy (e.g. TopDownPartition(top_n=10)) or a "
                    f"strategy's name, not {inner!r}"
                )
            given = [f for f in INNER_FIELDS if getattr(self, f) is not None]
            if given:
                raise ConfigError(
                    f"SelfConsistency({type(inner).__name__}(...)) takes {', '.join(given)} "
                    "from the strategy it wraps: give them to that strategy"
                )
        object.__setattr__(self, "inner", inner)
        for f in INNER_FIELDS:  # what the inner strategy uses, for the manifest
            object.__setattr__(self, f, getattr(inner, f, None))

    def inner_strategy(self) -> Strategy:
        assert not isinstance(self.inner, str)  # a name is built in __post_init__
        return self.inner

    def describe(self) -> dict[str, Any]:
        """The manifest's form: ``inner`` is the inner strategy's name, its parameters in the
        copied fields and all of them under ``inner_options``."""
        inner = self.inner_strategy()
        return {
            **vars(self),
            "inner": inner.name,
            "inner_options": describe_strategy(inner),
        }

    def plan(self, n: int) -> Plan:
        combine = borda if self.aggregate == "borda" else kemeny
        inner = self.inner_strategy().plan(n)
        try:
            batch = next(inner)
            while True:
                asked = [shuffled(w, c, self.seed) for w in batch for c in range(self.shuffles)]
                answers = yield asked
                merged = []
                for j, window in enumerate(batch):
                    mine = answers[j * self.shuffles : (j + 1) * self.shuffles]
                    for shown, answer in zip(asked[j * self.shuffles :], mine, strict=False):
                        check_answer(shown, answer)
                    merged.append(combine(window, [list(a) for a in mine]))
                batch = inner.send(merged)
        except StopIteration as stop:
            return list(stop.value)


def describe_strategy(strategy: Strategy) -> dict[str, Any]:
    """A strategy's parameters as plain JSON values (for a manifest)."""
    describe = getattr(strategy, "describe", None)
    if describe is not None:
        return dict(describe())
    return dict(vars(strategy))
