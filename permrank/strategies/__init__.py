"""Strategies: which windows to ask and how to merge their answers. Pure, no I/O.

A strategy is a value a user names: ``get_strategy("sliding", window_size=20, step=10)``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Plan, Strategy, Window, run_plan
from .sliding import SlidingWindow, window_bounds

STRATEGIES: dict[str, type] = {"sliding": SlidingWindow}


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
    "SlidingWindow",
    "Strategy",
    "Window",
    "get_strategy",
    "register",
    "run_plan",
    "window_bounds",
]
