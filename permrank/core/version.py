"""permrank's version: from the installed package's metadata, the one place it is written."""

from __future__ import annotations

from functools import cache
from importlib import metadata


@cache
def version() -> str:
    try:
        return metadata.version("permrank")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"
