"""A response cache in front of any backend: one SQLite file, safe for several processes.

A window asked twice with the same endpoint, model, messages and sampling parameters is answered
from the cache, without a call: a repeated run makes no model calls, and a run killed half-way
resumes without asking again what was already answered. The key is the SHA-256 of the endpoint,
the model, the exact messages and every sampling parameter (``max_tokens``, ``temperature``,
``seed`` and the extra request fields). The value is what the model answered: its text, token
counts and finish reason. Nothing else is stored: never an API key, never a request header.

Reads and writes run on a thread of the cache's own (never on the event loop), and two identical
requests in flight at once make one call: the second waits for the first's answer (single flight).
An embedded or loopback llama.cpp server is keyed by its model file (``identity``: path, size,
modification time), not by its random port, so the next run finds its answers again.

The file is in WAL mode with a busy timeout, so processes sharing it read while another writes
and wait for each other's writes instead of failing. Each answer's commit is queued on the cache's
thread as soon as it arrives (the caller counts it and goes on without waiting; closing the cache,
as an interrupted run does, waits for queued commits), so a process killed at any moment loses at
most the answers in flight or just arrived.

Default location: ``$PERMRANK_CACHE_DIR/cache.sqlite``, else
``$XDG_CACHE_HOME/permrank/cache.sqlite``, else ``~/.cache/permrank/cache.sqlite``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from permrank.backends.base import Backend, Exchange
from permrank.core.errors import ConfigError
from permrank.core.types import Completion

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


def wal_mode(db: sqlite3.Connection) -> None:
    """Switch ``db`` to WAL. SQLite answers "database is locked" at once, without the busy
    timeout, when another process is switching or opening the same file: wait and try again
    (up to ``BUSY_TIMEOUT_S``), as the busy timeout would."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def default_cache_path() -> Path:
    """Where the CLI keeps its cache unless told otherwise (``--cache PATH``)."""
    folder = os.environ.get("PERMRANK_CACHE_DIR")
    if folder:
        return Path(folder) / "cache.sqlite"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "permrank" / "cache.sqlite"


def answer_key(material: Mapping[str, Any], *, kind: str = "") -> str:
    """The one way a cache key is made: SHA-256 of everything that decides the answer, as
    canonical JSON (keys sorted, no spaces), prefixed ``kind:`` when a kind is given."""
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return f"{kind}:{digest}" if kind else digest


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
    """The key of a window's chat completion (``answer_key`` of what decides it)."""
    return answer_key(
        {
            "endpoint": endpoint,
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "extra": extra or {},
        }
    )


def request_key(endpoint: str, model: str, route: str, body: dict[str, Any]) -> str:
    """The key of a raw request a scoring method sends (``answer_key``, kind ``request``)."""
    material = {"endpoint": endpoint, "model": model, "route": route, "body": body}
    return answer_key(material, kind="request")


T = TypeVar("T")


class ResponseCache:
    """Model answers by key, in one SQLite file that several processes may share."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()

    def _executor(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="permrank-cache")
        return self._thread

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """``work()`` on the cache's own thread: SQLite never blocks the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor(), work)

    async def aget(self, key: str) -> Completion | None:
        # On the cache's one thread, after every commit queued before it (``put_soon``).
        return await self._off_loop(lambda: self._get(key))

    def put_soon(self, key: str, model: str, completion: Completion) -> None:
        """Queue the answer's commit on the cache's thread and return at once.

        The caller goes on without a pause in which it could be interrupted, so an answer that
        arrived is always counted, and its commit still happens: ``close`` (an interrupted run
        closes its cache too) waits for every queued commit. A commit that fails is a warning;
        the answer itself is not lost to the run."""
        future = self._executor().submit(self.put, key, model, completion)
        self._pending.add(future)
        future.add_done_callback(self._committed)

    def _committed(self, future: Future[None]) -> None:
        self._pending.discard(future)
        error = None if future.cancelled() else future.exception()
        if error is not None:
            log.warning("an answer was not kept in the cache %s: %s", self.path, error)

    def flush(self) -> None:
        """Wait until every commit queued by ``put_soon`` is done."""
        wait(list(self._pending))

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
                wal_mode(db)
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
        self.flush()
        return self._get(key)

    def _get(self, key: str) -> Completion | None:
        with self._lock:
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
        with self._lock:
            self._put(key, model, completion)

    def _put(self, key: str, model: str, completion: Completion) -> None:
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
        self.flush()
        with self._lock:
            return int(self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class CachingBackend:
    """Any Backend, with answers kept in a ResponseCache. Cached answers say ``cached=True``
    and carry the token counts of the call that produced them (their latency is 0).

    ``identity`` stands for the endpoint in the keys when answers do not depend on where the
    server listens (an embedded llama.cpp server: its model file); else the endpoint is used."""

    def __init__(
        self, inner: Backend, cache: ResponseCache | str | Path, *, identity: str | None = None
    ):
        self.inner = inner
        self.cache = cache if isinstance(cache, ResponseCache) else ResponseCache(cache)
        self.model = inner.model
        self.endpoint = inner.endpoint
        self.identity = identity
        self.hits = 0
        self.misses = 0
        self._in_flight: dict[str, asyncio.Future[Any]] = {}

    async def _single_flight(self, key: str, make: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``make()``'s result, computed once for concurrent callers of one key; True for a
        caller that waited for another's call."""
        running = self._in_flight.get(key)
        if running is not None:
            try:
                return await asyncio.shield(running), True
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this caller was cancelled
                # The caller making the call was cancelled (its query lost): ask ourselves.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await make()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]

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
            self.identity or self.endpoint,
            self.model,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            extra=extra,
        )

        async def ask() -> Completion:
            found = await self.cache.aget(key)
            if found is not None:
                self.hits += 1
                return found
            completion = await self.inner.complete(
                messages, max_tokens=max_tokens, temperature=temperature, seed=seed, extra=extra
            )
            self.misses += 1
            self.cache.put_soon(key, self.model, completion)
            return completion

        completion, shared = await self._single_flight(key, ask)
        if shared:  # answered by another caller's call: no call of its own
            self.hits += 1
            return completion.model_copy(
                update={"cached": True, "latency_s": 0.0, "queued_s": 0.0, "retries": 0}
            )
        return completion

    async def exchange(self, route: str, body: dict[str, Any]) -> Exchange:
        """A raw request (scoring methods), its whole JSON answer kept in the cache."""
        keyed = route
        if self.identity and "://" in route:  # a server's own route: not by its port either
            keyed = "/" + route.split("://", 1)[1].partition("/")[2]
        key = request_key(self.identity or self.endpoint, self.model, keyed, body)

        async def ask() -> Exchange:
            found = await self.cache.aget(key)
            if found is not None:
                self.hits += 1
                return Exchange(answer=json.loads(found.text), latency_s=0.0, cached=True)
            inner = getattr(self.inner, "exchange", None)
            if inner is not None:
                done = await inner(route, body)
            else:
                answer, latency = await self.inner.request(route, body)  # type: ignore[attr-defined]
                done = Exchange(answer=answer, latency_s=latency)
            self.misses += 1
            usage = done.answer.get("usage") or {}
            kept = Completion(
                text=json.dumps(done.answer, ensure_ascii=False),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
            self.cache.put_soon(key, self.model, kept)
            return done

        done, shared = await self._single_flight(key, ask)
        if shared:
            self.hits += 1
            return Exchange(answer=done.answer, latency_s=0.0, cached=True)
        return done

    async def request(self, route: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        done = await self.exchange(route, body)
        return done.answer, done.latency_s

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "cache": str(self.cache.path)}

    def __getattr__(self, name: str) -> Any:
        # Anything else a wrapped backend offers (``tokenize``, ...) passes through.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.cache.close()
