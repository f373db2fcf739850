"""Distillation: a teacher's rankings as training labels (``labels``) and the losses to train a
student on them (``train``). ``permrank.distill`` was one module: its names still resolve here."""

from typing import Any


def __getattr__(name: str) -> Any:  # the old module ``permrank.distill`` is ``labels`` now
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    try:
        return getattr(importlib.import_module("permrank.distill.labels"), name)
    except AttributeError:
        raise AttributeError(f"module 'permrank.distill' has no attribute {name!r}") from None
