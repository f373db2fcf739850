"""One way to build a named value from options: the strategies' and the methods' registries.

``build(kind, registry, name, options)`` looks ``name`` up in ``registry`` (a class per name) and
calls it with the ``options`` its dataclass fields take. An option left at None keeps the
field's default; an option the class does not take is refused with a ``ConfigError`` naming it,
except the ``shared`` ones (options given to every member of a registry, used by some).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from permrank.core.errors import ConfigError


def field_names(cls: type) -> set[str]:
    """The public dataclass fields of ``cls`` (its parameters)."""
    if not dataclasses.is_dataclass(cls):
        return set()
    return {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def lookup(kind: str, registry: Mapping[str, type], name: str, known: Iterable[str] = ()) -> type:
    try:
        return registry[name]
    except KeyError:
        names = [*known] or sorted(registry)
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(names)}") from None


def check_options(
    kind: str, name: str, allowed: set[str], options: Mapping[str, Any], shared: Iterable[str] = ()
) -> None:
    shared = set(shared)
    unknown = [k for k, v in options.items() if v is not None and k not in allowed | shared]
    if unknown:
        raise ConfigError(f"{kind} {name!r} does not take {', '.join(unknown)}")


def build(
    kind: str,
    registry: Mapping[str, type],
    name: str,
    options: Mapping[str, Any],
    *,
    shared: Iterable[str] = (),
    known: Iterable[str] = (),
) -> Any:
    """``registry[name](**options)``, options that are None left out, unknown ones refused."""
    cls = lookup(kind, registry, name, known)
    allowed = field_names(cls)
    check_options(kind, name, allowed, options, shared)
    return cls(**{k: v for k, v in options.items() if v is not None and k in allowed})
