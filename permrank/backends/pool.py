"""Several replicas of one model as one backend: ``PoolBackend([backend, ...])``.

Each window (or raw request) goes to the endpoint with the fewest requests in flight for its
weight (ties: in turn), so the windows of one
query may be answered by different replicas; they serve the same model (the probe checks it), so
the rankings are those of one endpoint. Every endpoint keeps its own limits (``concurrency``,
``rps``) and its own short retries; a request that still fails is re-sent to another endpoint
(counted in ``resent``). An endpoint that fails ``fail_threshold`` times in a row is taken out of
rotation for ``cooldown_s`` seconds, then tried again; a request fails only when no endpoint is
left to send it to (or after ``max_resends`` re-sends). ``describe()`` lists each endpoint with
its calls, tokens, failures and time, for the run manifest.

The pool wraps the public interface of any Backend: ``complete``, ``request`` (for the scoring
methods), ``describe`` and ``aclose``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from permrank.backends.base import Backend
from permrank.core.errors import BackendError, ConfigError
from permrank.core.types import Completion

log = logging.getLogger(__name__)

T = TypeVar("T")

EndpointSpec = str | tuple[str, float]
"""An endpoint as a user gives it: a base URL, or (base URL, weight)."""

FAIL_THRESHOLD = 2
COOLDOWN_S = 30.0
POOL_INNER_RETRIES = 1
"""Retries on the same endpoint before a request is re-sent to another one."""


@dataclass
class Member:
    """One endpoint of a pool and what it did."""

    backend: Any
    weight: float = 1.0
    capacity: int = 1 << 30
    """Requests in flight at most (the backend's own concurrency)."""
    in_flight: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    seconds: float = 0.0
    down_until: float = 0.0
    times_out: int = 0

    def stats(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "failures": self.failures,
            "seconds": round(self.seconds, 3),
            "times_out_of_rotation": self.times_out,
        }


def retryable_failure(exc: BaseException) -> bool:
    """Whether another endpoint may answer what this one failed: a refused connection, a
    timeout, 429 or 5xx yes; a request the server refused as malformed (400, 404) no."""
    from permrank.backends.openai import is_retryable

    cause = exc.__cause__ or exc.__context__
    return cause is None or is_retryable(cause)


class PoolBackend:
    """Replicas of one model behind one Backend interface (see the module's docstring)."""

    def __init__(
        self,
        backends: Sequence[Backend],
        weights: Sequence[float] | None = None,
        *,
        fail_threshold: int = FAIL_THRESHOLD,
        cooldown_s: float = COOLDOWN_S,
        max_resends: int | None = None,
    ):
        if not backends:
            raise ConfigError("a pool needs at least one endpoint")
        weights = list(weights) if weights is not None else [1.0] * len(backends)
        if len(weights) != len(backends):
            raise ConfigError(f"{len(weights)} weights for {len(backends)} endpoints")
        for backend, weight in zip(backends, weights, strict=True):
            if not weight > 0:
                raise ConfigError(f"{backend.endpoint}: weight must be positive (got {weight})")
        models = {b.model for b in backends}
        if len(models) > 1:
            raise ConfigError(
                "the endpoints of one run must serve the same model; got "
                + ", ".join(f"{b.endpoint} ({b.model})" for b in backends)
            )
        self.members = [
            Member(b, float(w), capacity=int(getattr(b, "concurrency", None) or 1 << 30))
            for b, w in zip(backends, weights, strict=True)
        ]
        self.model = backends[0].model
        self.endpoint = ",".join(b.endpoint for b in backends)
        """Every endpoint, in order: what the response cache keys answers by."""
        self.concurrency = sum(int(getattr(b, "concurrency", 1)) for b in backends)
        self.pool_concurrency = self.concurrency
        """Requests in flight in all (what ``Reranker`` sizes its queries in flight by)."""
        self.fail_threshold = fail_threshold
        self.cooldown_s = cooldown_s
        self.max_resends = max_resends if max_resends is not None else 2 * len(backends) + 1
        self.resent = 0
        self._clock: Callable[[], float] = time.monotonic
        self._turn = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._waiters_loop: asyncio.AbstractEventLoop | None = None

    # -- choosing ------------------------------------------------------------------------------
    def _pick(self, tried: set[int]) -> tuple[Member | None, bool]:
        """The endpoint for the next request, if one has a free slot; and whether any endpoint
        is still in rotation."""
        now = self._clock()
        live = [i for i, m in enumerate(self.members) if m.down_until <= now]
        free = [i for i in live if self.members[i].in_flight < self.members[i].capacity]
        choices = [i for i in free if i not in tried] or free
        if not choices:
            return None, bool(live)
        n = len(self.members)

        def load(i: int) -> tuple[float, int]:  # fewest in flight for the weight, then in turn
            member = self.members[i]
            return ((member.in_flight + 1) / member.weight, (i - self._turn) % n)

        index = min(choices, key=load)
        self._turn = index + 1
        return self.members[index], True

    async def _acquire(self, tried: set[int], last: BaseException | None) -> Member:
        # Requests wait here, not at an endpoint, until some endpoint has a free slot: a window
        # goes to whichever endpoint frees first.
        loop = asyncio.get_running_loop()
        if self._waiters_loop is not loop:
            self._waiters, self._waiters_loop = deque(), loop
        while True:
            member, live = self._pick(tried)
            if member is not None:
                member.in_flight += 1
                return member
            if not live:
                while self._waiters:  # they all learn it too
                    self._wake()
                raise BackendError(
                    f"no endpoint left: all {len(self.members)} endpoints are out of "
                    f"rotation after repeated failures (last: {last}). Check the servers, "
                    "then run again (a run resumes where it stopped)."
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken but gone: the slot goes to the next in line
                else:
                    self._waiters.remove(waiter)
                raise

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, member: Member) -> None:
        member.in_flight -= 1
        self._wake()

    async def _send(
        self, call: Callable[[Any], Awaitable[T]], tokens: Callable[[T], tuple[int, int]]
    ) -> T:
        tried: set[int] = set()
        last: BaseException | None = None
        resends = 0
        while True:
            member = await self._acquire(tried, last)
            index = self.members.index(member)
            started = time.perf_counter()
            try:
                result = await call(member.backend)
            except BackendError as exc:
                if not retryable_failure(exc):
                    raise
                last = exc
                member.failures += 1
                member.consecutive_failures += 1
                if member.consecutive_failures >= self.fail_threshold:
                    member.down_until = self._clock() + self.cooldown_s
                    member.times_out += 1
                    log.warning(
                        "%s failed %d times in a row: out of rotation for %.0f s (%s)",
                        member.backend.endpoint,
                        member.consecutive_failures,
                        self.cooldown_s,
                        exc,
                    )
                tried.add(index)
                if resends >= self.max_resends:
                    raise
                resends += 1
                self.resent += 1
                continue
            finally:
                member.seconds += time.perf_counter() - started
                self._release(member)
            member.consecutive_failures = 0
            member.calls += 1
            prompt, completion = tokens(result)
            member.prompt_tokens += prompt
            member.completion_tokens += completion
            return result

    # -- the Backend interface -----------------------------------------------------------------
    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        async def call(backend: Any) -> Completion:
            return await backend.complete(
                messages, max_tokens=max_tokens, temperature=temperature, seed=seed, extra=extra
            )

        return await self._send(call, lambda c: (c.prompt_tokens, c.completion_tokens))

    async def request(self, route: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """A raw POST (the scoring methods' way in), sent like a window."""
        for member in self.members:
            if getattr(member.backend, "request", None) is None:
                raise ConfigError(
                    f"{member.backend.endpoint}: this backend cannot send raw requests"
                )

        def tokens(answer: tuple[dict[str, Any], float]) -> tuple[int, int]:
            usage = answer[0].get("usage") or {}
            return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)

        return await self._send(lambda backend: backend.request(route, body), tokens)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "pool",
            "model": self.model,
            "endpoint": self.endpoint,
            "endpoints": [m.backend.describe() | m.stats() for m in self.members],
            "concurrency": self.concurrency,
            "resent": self.resent,
            "fail_threshold": self.fail_threshold,
            "cooldown_s": self.cooldown_s,
        }

    def redact(self, text: str) -> str:
        for member in self.members:
            redact = getattr(member.backend, "redact", None)
            if redact is not None:
                text = redact(text)
        return text

    async def aclose(self) -> None:
        for member in self.members:
            await member.backend.aclose()


def endpoint_specs(endpoints: Sequence[EndpointSpec]) -> list[tuple[str, float]]:
    """``(url, weight)`` of each endpoint as given (a URL alone weighs 1)."""
    specs = []
    for spec in endpoints:
        if isinstance(spec, str):
            specs.append((spec, 1.0))
        else:
            url, weight = spec
            specs.append((str(url), float(weight)))
    return specs


def pool_backend(
    endpoints: Sequence[EndpointSpec],
    model: str,
    *,
    concurrency: int = 8,
    max_retries: int = 5,
    **openai_options: Any,
) -> PoolBackend:
    """A pool of ``OpenAIBackend`` s, one per endpoint, ``concurrency`` requests in flight on
    each (times its weight); a failed request is retried once on its endpoint, then re-sent to
    the others up to ``max_retries`` times."""
    from permrank.backends.openai import OpenAIBackend

    specs = endpoint_specs(endpoints)
    backends = [
        OpenAIBackend(
            url,
            model,
            concurrency=max(1, round(concurrency * weight)),
            max_retries=min(max_retries, POOL_INNER_RETRIES),
            **openai_options,
        )
        for url, weight in specs
    ]
    return PoolBackend(backends, [w for _, w in specs], max_resends=max_retries)


def read_endpoints(path: str | Path) -> list[tuple[str, float]]:
    """The endpoints of a file: one base URL a line, optionally followed by a weight;
    blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--endpoints {path}: cannot read it ({exc.strerror or exc})") from None
    specs: list[tuple[str, float]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) > 2:
            raise ConfigError(f"{where}: expected 'URL [WEIGHT]', got {raw.strip()!r}")
        url = fields[0]
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: {url!r} is not an http:// or https:// base URL")
        weight = 1.0
        if len(fields) == 2:
            try:
                weight = float(fields[1].removeprefix("weight="))
            except ValueError:
                weight = -1.0
            if not weight > 0:
                raise ConfigError(f"{where}: weight must be a positive number (got {fields[1]!r})")
        specs.append((url, weight))
    if not specs:
        raise ConfigError(f"--endpoints {path}: no endpoint in it (one base URL a line)")
    return specs
