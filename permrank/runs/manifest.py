"""The run manifest: everything needed to reproduce and account for a run (never a secret)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import sys
from typing import Any

from permrank.core.types import Usage

PACKAGES = ("permrank", "openai", "aiohttp", "tiktoken", "pydantic", "ir-measures")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES + extra:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def build_manifest(
    *,
    command: str,
    parameters: dict[str, Any],
    totals: Usage,
    queries: int,
    failed: dict[str, str],
    started: str,
    seconds: float,
    files: dict[str, str | None],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "command": command,
        "started": started,
        "finished": now(),
        "seconds": round(seconds, 3),
        "files": files,
        "parameters": parameters,
        "totals": {
            "queries": queries,
            **totals.model_dump(),
            # the queries that failed (this run's, and any counted by earlier sessions)
            "failed_queries": max(len(failed), totals.failed_queries),
            "total_tokens": totals.total_tokens,
        },
        "failed": failed,
        "versions": package_versions(),
        "platform": platform.platform(),
        **(extra or {}),
    }
