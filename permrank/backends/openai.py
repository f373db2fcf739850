"""Any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, ...).

Requests go through ``openai.AsyncOpenAI`` (its own retries off), or, for a plain ``http://``
endpoint that no proxy applies to (a local vLLM or llama.cpp server), through the lean client of
``permrank.backends.http``, which costs a fraction of the SDK's CPU per request
(``transport="openai"`` forces the SDK). Either way tenacity retries 429, 5xx, timeouts and
dropped connections with exponential backoff and jitter, honouring ``Retry-After``, a bounded
number of times; asyncio-throttle caps requests per second; a semaphore caps requests in flight.
The API key is read from an environment variable and never logged or written.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from typing import Any

import openai
from asyncio_throttle import Throttler
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from .. import __version__
from ..errors import BackendError, ConfigError
from ..types import Completion
from .http import HTTPStatusError, PlainHTTPClient, TransportError, plain_http_applies

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


TRANSPORTS = ("auto", "openai", "plain")


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError | HTTPStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError | TransportError | asyncio.TimeoutError)


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
    if isinstance(exc, openai.APIStatusError | HTTPStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
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
    ):
        if not base_url:
            raise ConfigError("no endpoint: give --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise ConfigError("no model: give --model, the name the endpoint serves")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1 (got {concurrency})")
        if rps is not None and rps <= 0:
            raise ConfigError(f"rps must be positive (got {rps}); leave it out for no limit")
        if transport not in TRANSPORTS:
            raise ConfigError(
                f"transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})"
            )
        if transport == "plain" and not base_url.startswith("http://"):
            raise ConfigError(
                f"transport 'plain' speaks only http:// (got {base_url!r}); use 'auto' or 'openai'"
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
        self.plain = transport == "plain" or (
            transport == "auto" and plain_http_applies(self.endpoint)
        )
        """Requests go through ``PlainHTTPClient`` (else the openai SDK)."""
        self._client: openai.AsyncOpenAI | PlainHTTPClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._throttler: Throttler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure(self) -> openai.AsyncOpenAI | PlainHTTPClient:
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
                self._client = PlainHTTPClient(
                    self.endpoint,
                    headers={
                        "Authorization": f"Bearer {key}",
                        "User-Agent": f"permrank/{__version__}",
                    },
                    timeout_s=self.timeout_s,
                    max_idle=self.concurrency,
                )
                return self._client
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

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = retry_after_seconds(exc) if exc is not None else None
        if asked is not None:
            return min(asked, self.retry_max_s)
        backoff = self.retry_base_s * 2 ** (state.attempt_number - 1)
        return min(self.retry_max_s, backoff) * (0.5 + random.random() / 2)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: attempt %d failed (%s); retrying",
            self.endpoint,
            state.attempt_number,
            self.redact(describe_failure(exc)) if exc else "?",
        )

    async def request(self, route: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POST ``body`` to ``route`` with limits and retries; the JSON answer and its latency."""
        client = self._ensure()
        assert self._semaphore is not None
        started = time.perf_counter()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async with self._semaphore:
                async for attempt in retrying:
                    with attempt:
                        if self._throttler is not None:
                            await self._throttler.acquire()
                        if isinstance(client, PlainHTTPClient):
                            answer = await client.post_json(route, body)
                        else:
                            answer = await client.post(route, body=body, cast_to=object)
        except Exception as exc:
            if isinstance(
                exc, openai.APIError | HTTPStatusError | TransportError | asyncio.TimeoutError
            ):
                tries = self.max_retries + 1 if is_retryable(exc) else 1
                reason = self.redact(describe_failure(exc))
                raise BackendError(
                    f"{self.endpoint}{route}: request failed after {tries} attempt(s): "
                    f"{reason}. Check that the server is up and serves model "
                    f"{self.model!r}, or raise --max-retries / --timeout."
                ) from None
            raise
        if not isinstance(answer, dict | list):  # a list: TEI's /rerank
            raise BackendError(
                f"{self.endpoint}{route}: answer is not a JSON object: {answer!r:.200}"
            )
        return answer, time.perf_counter() - started

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
        answer, latency = await self.request("/chat/completions", body)
        choices = answer.get("choices") or [{}]
        choice = choices[0] or {}
        message = choice.get("message") or {}
        usage = answer.get("usage") or {}
        return Completion(
            text=message.get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
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
            "transport": "plain http" if self.plain else "openai sdk",
        }

    async def aclose(self) -> None:
        if self._client is not None:
            if self._loop is asyncio.get_running_loop():  # else its loop is gone, and with it
                if isinstance(self._client, PlainHTTPClient):
                    await self._client.aclose()
                else:
                    await self._client.close()
            self._client = None
