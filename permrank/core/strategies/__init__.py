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

from permrank.core.registry import build
from permrank.core.strategies.base import Plan, Strategy, Window, run_plan
from permrank.core.strategies.selfconsistency import SelfConsistency, describe_strategy
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
    """Build a strategy by name; parameters a strategy does not take are ignored if None.

    ``get_strategy("selfconsistency", inner="tdpart", top_n=10)`` builds the inner strategy from
    its name and the parameters it takes; ``SelfConsistency(TopDownPartition(top_n=10))`` is the
    same value.
    """
    strategy: Strategy = build("strategy", STRATEGIES, name, params)
    return strategy


__all__ = [
    "Plan",
    "STRATEGIES",
    "SelfConsistency",
    "SlidingWindow",
    "Strategy",
    "TopDownPartition",
    "Tournament",
    "Window",
    "describe_strategy",
    "get_strategy",
    "register",
    "run_plan",
    "window_bounds",
]
