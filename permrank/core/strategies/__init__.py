"""Strategies: which windows to ask and how to merge their answers. Pure, no I/O.

A strategy is a value a user names: ``get_strategy("sliding", window_size=20, step=10)``.

- ``sliding``: RankGPT's sliding window; one window per round (9 rounds for 100 with 20/10).
- ``tournament``: parallel heats and merges; the true top ``top_n`` of a perfect judge is
  guaranteed; 3 rounds for the top-10 of 100 with windows of 20.
- ``tdpart``: top-down partitioning around a pivot (Parry et al. 2024); same guarantee,
  usually 3 rounds and about 0.7x the passages shown by ``sliding``.
- ``selfconsistency``: asks each window of an ``inner`` strategy in several shuffled orders at
  once and aggregates them (Borda or Kemeny), to cancel position bias (Tang et al. 2024).
"""

from __future__ import annotations

from typing import Any

from permrank.core.errors import ConfigError
from permrank.core.strategies.base import Plan, Strategy, Window, run_plan
from permrank.core.strategies.selfconsistency import SelfConsistency
from permrank.core.strategies.sliding import SlidingWindow, window_bounds
from permrank.core.strategies.tdpart import TopDownPartition
from permrank.core.strategies.tournament import Tournament

STRATEGIES: dict[str, type] = {
    "sliding": SlidingWindow,
    "tournament": Tournament,
    "tdpart": TopDownPartition,
    "selfconsistency": SelfConsistency,
}


def register(name: str, cls: type) -> None:
    STRATEGIES[name] = cls


def get_strategy(name: str = "sliding", **params: Any) -> Strategy:
    """Build a strategy by name; parameters a strategy does not take are ignored if None."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        ) from None
    fields = getattr(cls, "__dataclass_fields__", {})
    unknown = [k for k, v in params.items() if k not in fields and v is not None]
    if unknown:
        raise ConfigError(f"strategy {name!r} does not take {', '.join(unknown)}")
    return cls(**{k: v for k, v in params.items() if k in fields and v is not None})


__all__ = [
    "Plan",
    "STRATEGIES",
    "SelfConsistency",
    "SlidingWindow",
    "Strategy",
    "TopDownPartition",
    "Tournament",
    "Window",
    "get_strategy",
    "register",
    "run_plan",
    "window_bounds",
]
