"""A response cache in front of any backend: one SQLite file, safe for several processes.

A window asked twice with the same endpoint, model, messages and sampling parameters is answered
from the cache, without a call: a repeated run makes no model calls, and a run killed half-way
resumes without asking again what was already answered. The key is the SHA-256 of the endpoint,
the model, the exact messages and every sampling parameter (``max_tokens``, ``temperature``,
``seed`` and the extra request fields). The value is what the model answered: its text, token
counts and finish reason. Nothing else is stored: never an API key, never a request header.

The file is in WAL mode with a busy timeout, so processes sharing it read while another writes
and wait for each other's writes instead of failing. Each answer is committed as soon as it
arrives, so a process killed at any moment loses at most the answers still in flight.

Default location: ``$PERMRANK_CACHE_DIR/cache.sqlite``, else
``$XDG_CACHE_HOME/permrank/cache.sqlite``, else ``~/.cache/permrank/cache.sqlite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..types import Completion
from .base import Backend

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 60.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT,
    created REAL NOT NULL
)
"""


def default_cache_path() -> Path:
    """Where the CLI keeps its cache unless told otherwise (``--cache PATH``)."""
    folder = os.environ.get("PERMRANK_CACHE_DIR")
    if folder:
        return Path(folder) / "cache.sqlite"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "permrank" / "cache.sqlite"


def cache_key(
    endpoint: str,
    model: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    extra: dict[str, Any] | None,
) -> str:
    """SHA-256 of everything that decides the answer (canonical JSON, keys sorted)."""
    material = {
        "endpoint": endpoint,
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "extra": extra or {},
    }
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Model answers by key, in one SQLite file that several processes may share."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(
                    self.path,
                    timeout=BUSY_TIMEOUT_S,
                    isolation_level=None,  # autocommit: every answer is committed at once
                    check_same_thread=False,
                )
                db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute(SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(
                    f"cannot open the response cache {self.path}: {exc}. Give another "
                    "--cache PATH, or --no-cache to run without one."
                ) from None
            self._db = db
        return self._db

    def get(self, key: str) -> Completion | None:
        row = (
            self._connect()
            .execute(
                "SELECT text, prompt_tokens, completion_tokens, finish_reason "
                "FROM responses WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        if row is None:
            return None
        text, prompt_tokens, completion_tokens, finish_reason = row
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            cached=True,
        )

    def put(self, key: str, model: str, completion: Completion) -> None:
        self._connect().execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                model,
                completion.text,
                completion.prompt_tokens,
                completion.completion_tokens,
                completion.finish_reason,
                time.time(),
            ),
        )

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class CachingBackend:
    """Any Backend, with answers kept in a ResponseCache. Cached answers say ``cached=True``
    and carry the token counts of the call that produced them (their latency is 0)."""

    def __init__(self, inner: Backend, cache: ResponseCache | str | Path):
        self.inner = inner
        self.cache = cache if isinstance(cache, ResponseCache) else ResponseCache(cache)
        self.model = inner.model
        self.endpoint = inner.endpoint
        self.hits = 0
        self.misses = 0

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        key = cache_key(
            self.endpoint,
            self.model,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            extra=extra,
        )
        found = self.cache.get(key)
        if found is not None:
            self.hits += 1
            return found
        completion = await self.inner.complete(
            messages, max_tokens=max_tokens, temperature=temperature, seed=seed, extra=extra
        )
        self.misses += 1
        self.cache.put(key, self.model, completion)
        return completion

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "cache": str(self.cache.path)}

    def __getattr__(self, name: str) -> Any:
        # Anything else a wrapped backend offers (``request``, ``tokenize``, ...) passes through.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.cache.close()
