"""Any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, ...).

Requests to a plain ``http://`` endpoint that no proxy applies to (a local vLLM or llama.cpp
server) go through aiohttp (``permrank.backends.client``: a C parser, a fraction of the SDK's CPU
per request); HTTPS endpoints, proxies and ``transport="openai"`` go through
``openai.AsyncOpenAI`` (its own retries off), imported only then. Either way 429, 5xx,
timeouts and dropped connections are retried with exponential backoff and jitter, honouring
``Retry-After``, a bounded number of times (each counted); asyncio-throttle caps requests per
second; a semaphore caps requests in flight.
The API key is read from an environment variable and never logged or written.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from asyncio_throttle import Throttler

from permrank.backends.base import Exchange
from permrank.backends.client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    HTTPClient,
    HTTPStatusError,
    ResponseTooLarge,
    TransportError,
    lost_on_a_closed_connection,
    plain_http_applies,
)
from permrank.core.errors import BackendError, ConfigError
from permrank.core.types import Completion
from permrank.core.version import version

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


TRANSPORTS = ("auto", "openai", "plain", "aiohttp")
"""``plain`` and ``aiohttp`` are one: aiohttp (``plain`` was permrank's own client before)."""


def _sdk() -> Any:
    """The openai module if something imported it (else no exception can be one of its)."""
    return sys.modules.get("openai")


def _status_code(exc: BaseException) -> int | None:
    if isinstance(exc, HTTPStatusError):
        return exc.status_code
    sdk = _sdk()
    if sdk is not None and isinstance(exc, sdk.APIStatusError):
        return int(exc.status_code)
    return None


def is_retryable(exc: BaseException) -> bool:
    status = _status_code(exc)
    if status is not None:
        return status in RETRYABLE_STATUS or status >= 500
    if isinstance(exc, TransportError | asyncio.TimeoutError):
        return True
    sdk = _sdk()
    return sdk is not None and isinstance(exc, sdk.APIConnectionError)


def is_request_failure(exc: BaseException) -> bool:
    """An exception of a request (either client's), as opposed to a bug."""
    if isinstance(exc, HTTPStatusError | TransportError | asyncio.TimeoutError):
        return True
    sdk = _sdk()
    return sdk is not None and isinstance(exc, sdk.APIError)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The delay a server asked for in ``Retry-After`` (seconds or an HTTP date), if any."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe_failure(exc: BaseException) -> str:
    status = _status_code(exc)
    if status is not None:
        return f"HTTP {status}: {getattr(exc, 'message', exc)}"
    sdk = _sdk()
    if isinstance(exc, asyncio.TimeoutError) or (
        sdk is not None and isinstance(exc, sdk.APITimeoutError)
    ):
        return "timed out"
    if sdk is not None and isinstance(exc, sdk.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        return f"connection failed ({type(cause).__name__ if cause else 'no answer'})"
    if isinstance(exc, TransportError):
        cause = exc.cause
        return f"connection failed ({type(cause).__name__ if cause else exc})"
    return f"{type(exc).__name__}: {exc}"


class OpenAIBackend:
    """Chat completions over an OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        rps: float | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        retry_base_s: float = 0.5,
        retry_max_s: float = 60.0,
        transport: str = "auto",
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        if not base_url:
            raise ConfigError("no endpoint: give --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise ConfigError("no model: give --model, the name the endpoint serves")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1 (got {concurrency})")
        if rps is not None and rps <= 0:
            raise ConfigError(f"rps must be positive (got {rps}); leave it out for no limit")
        if max_response_bytes < 1024:
            raise ConfigError(
                f"max_response_bytes must be at least 1024 (got {max_response_bytes})"
            )
        if transport not in TRANSPORTS:
            raise ConfigError(
                f"transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})"
            )
        if transport in ("plain", "aiohttp") and not base_url.startswith("http://"):
            raise ConfigError(
                f"transport {transport!r} speaks only http:// (got {base_url!r}); use 'auto' or "
                "'openai'"
            )
        self.endpoint = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.rps = rps
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_response_bytes = max_response_bytes
        self.plain = transport in ("plain", "aiohttp") or (
            transport == "auto" and plain_http_applies(self.endpoint)
        )
        """Requests go through aiohttp (else the openai SDK)."""
        self._client: openai.AsyncOpenAI | HTTPClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._throttler: Throttler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure(self) -> openai.AsyncOpenAI | HTTPClient:
        # A client, its connections and its limits belong to one event loop: a new loop (each
        # asyncio.run, or the sync API's own loop after an async call) gets its own.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._loop = loop
            key = os.environ.get(self.api_key_env) or "EMPTY"
            self._semaphore = asyncio.Semaphore(self.concurrency)
            if self.rps is not None:
                self._throttler = Throttler(rate_limit=1, period=1.0 / self.rps)
            if self.plain:
                if not isinstance(self._client, HTTPClient):
                    self._client = HTTPClient(
                        headers={
                            "Authorization": f"Bearer {key}",
                            "User-Agent": f"permrank/{version()}",
                        },
                        timeout_s=self.timeout_s,
                        limit=self.concurrency,
                        max_response_bytes=self.max_response_bytes,
                    )
                return self._client  # its session follows the running loop
            import openai

            self._client = openai.AsyncOpenAI(
                base_url=self.endpoint,
                api_key=key,
                max_retries=0,
                timeout=self.timeout_s,
                # openai's default wrapper closes itself on the running loop when collected,
                # which fails noisily once a client of a finished loop is dropped.
                http_client=openai.DefaultAsyncHttpxClient(
                    timeout=self.timeout_s, limits=self._connection_limits()
                ),
            )
        return self._client

    def _connection_limits(self) -> Any:
        """A pool of ``concurrency`` connections, all kept alive: no more can be in use at once
        (the semaphore), and the pool checks every connection it holds on each request, so a
        larger pool (openai's default keeps 100, allows 1000) only costs CPU."""
        import openai

        default = openai.DEFAULT_CONNECTION_LIMITS  # httpx's or httpx2's Limits, as openai uses
        return type(default)(
            max_connections=self.concurrency,
            max_keepalive_connections=self.concurrency,
            keepalive_expiry=default.keepalive_expiry,
        )

    def redact(self, text: str) -> str:
        """``text`` with the API key blanked out (a server may quote it in an error)."""
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "[api key]") if key and len(key) >= 4 else text

    def retry_delay(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` after ``exc`` ended attempt
        ``attempt``: what ``Retry-After`` asks (capped), else exponential backoff with jitter;
        none after a first attempt lost on a connection the server had closed."""
        if attempt == 1 and lost_on_a_closed_connection(exc):
            return 0.0  # most likely a kept-alive connection the server had closed: a fresh one
        asked = retry_after_seconds(exc)
        if asked is not None:
            return min(asked, self.retry_max_s)
        backoff = self.retry_base_s * 2 ** (attempt - 1)
        return float(min(self.retry_max_s, backoff) * (0.5 + random.random() / 2))

    async def request(self, route: str, body: dict[str, Any]) -> tuple[Any, float]:
        """POST ``body`` to ``route`` with limits and retries; the JSON answer and its latency."""
        done = await self.exchange(route, body)
        return done.answer, done.latency_s

    async def exchange(self, route: str, body: dict[str, Any]) -> Exchange:
        """POST ``body`` to ``route`` (under the endpoint, or an absolute ``http://`` URL of the
        server's own routes) with limits and retries; the answer and what it cost."""
        client = self._ensure()
        assert self._semaphore is not None
        url = route if route.startswith(("http://", "https://")) else self.endpoint + route
        started = time.perf_counter()
        wire = 0.0
        attempts = 0
        try:
            async with self._semaphore:
                # The retry loop by hand: no per-request objects on the path every request takes.
                while True:
                    if self._throttler is not None:
                        await self._throttler.acquire()
                    attempts += 1
                    sent = time.perf_counter()
                    try:
                        if isinstance(client, HTTPClient):
                            answer = await client.post_json(url, body)
                        else:
                            answer = await client.post(url, body=body, cast_to=object)
                    except Exception as exc:
                        wire += time.perf_counter() - sent
                        if attempts > self.max_retries or not is_retryable(exc):
                            raise
                        log.warning(
                            "%s: attempt %d failed (%s); retrying",
                            self.endpoint,
                            attempts,
                            self.redact(describe_failure(exc)),
                        )
                        await asyncio.sleep(self.retry_delay(exc, attempts))
                        continue
                    wire += time.perf_counter() - sent
                    break
        except ResponseTooLarge as exc:
            raise BackendError(self.redact(str(exc))) from None
        except Exception as exc:
            if is_request_failure(exc):
                reason = self.redact(describe_failure(exc))
                failure = BackendError(
                    f"{url}: request failed after {attempts} attempt(s): "
                    f"{reason}. Check that the server is up and serves model "
                    f"{self.model!r}, or raise --max-retries / --timeout."
                )
                failure.retries = max(0, attempts - 1)  # type: ignore[attr-defined]
                raise failure from None
            raise
        if not isinstance(answer, dict | list):  # a list: TEI's /rerank
            raise BackendError(f"{url}: answer is not a JSON object: {answer!r:.200}")
        return Exchange(
            answer=answer,
            latency_s=wire,
            queued_s=time.perf_counter() - started - wire,
            retries=attempts - 1,
        )

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        if extra:
            body.update(extra)
        done = await self.exchange("/chat/completions", body)
        answer = done.answer
        choices = answer.get("choices") or [{}]
        choice = choices[0] or {}
        message = choice.get("message") or {}
        usage = answer.get("usage") or {}
        return Completion(
            text=message.get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=done.latency_s,
            queued_s=done.queued_s,
            retries=done.retries,
            finish_reason=choice.get("finish_reason"),
            raw=answer,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "endpoint": self.endpoint,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "concurrency": self.concurrency,
            "rps": self.rps,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "transport": "aiohttp" if self.plain else "openai sdk",
        }

    async def aclose(self) -> None:
        if self._client is not None:
            if isinstance(self._client, HTTPClient):
                await self._client.aclose()  # a session of another loop is dropped, not awaited
            elif self._loop is asyncio.get_running_loop():  # else its loop is gone, and with it
                await self._client.close()
            self._client = None
