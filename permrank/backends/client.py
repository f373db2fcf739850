"""permrank's HTTP: aiohttp for every request it makes itself (chat completions, raw routes,
the endpoint probe, a server's ``/tokenize``). The openai SDK is used only where it is needed
(TLS endpoints and proxies, see ``plain_http_applies``), imported then and not before.

aiohttp parses HTTP/1.1 in C (llhttp): interim ``1xx`` answers (``100 Continue``,
``103 Early Hints``) are read and skipped before the real answer, chunked and ``Content-Length``
bodies, ``Connection: close`` and kept-alive connections (a pool of at most ``limit``, the
backend's concurrency). A body larger than ``max_response_bytes`` is refused (``ResponseTooLarge``)
without being held: memory stays bounded whatever a server sends.

Failures are exceptions the backend maps and retries: ``HTTPStatusError`` (status >= 400, with its
headers for ``Retry-After``), ``TransportError`` (refused, reset, garbled or cut answers; a
request re-sent on a fresh connection is therefore an attempt the backend counts) and
``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""The largest answer read (``--max-response-bytes``): a chat answer is a few kilobytes."""


class TransportError(Exception):
    """The connection failed before a whole answer came back (refused, reset, garbled)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def lost_on_a_closed_connection(exc: BaseException) -> bool:
    """A request that failed on a connection the server had closed (most likely a kept-alive
    one it closed while idle, e.g. llama.cpp's after 5 s): worth sending again at once on a
    fresh one. A refused connection is not that."""
    return (
        isinstance(exc, TransportError)
        and isinstance(exc.cause, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
        and not isinstance(exc.cause, aiohttp.ClientConnectorError)
    )


class HTTPStatusError(Exception):
    """The server answered with status >= 400."""

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes):
        self.status_code = status_code
        self.headers = headers
        self.body = body
        self.message = error_message(body)
        super().__init__(f"HTTP {status_code}: {self.message}")

    @property
    def response(self) -> HTTPStatusError:
        """Itself: ``retry_after_seconds`` reads ``exc.response.headers`` (as for the SDK)."""
        return self


class ResponseTooLarge(Exception):
    """An answer longer than ``max_response_bytes`` (never retried: it would be as long)."""

    def __init__(self, url: str, limit: int, length: int | None):
        said = f" ({length} bytes announced)" if length is not None else ""
        super().__init__(
            f"{url}: the answer is larger than --max-response-bytes ({limit} bytes){said}; "
            "raise --max-response-bytes if that is expected, or check what the server sends"
        )


def error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:300]
        if isinstance(error, str):
            return error[:300]
    return text[:300]


def plain_http_applies(base_url: str) -> bool:
    """True for an ``http://`` URL that no proxy setting of the environment applies to."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if not proxies.get("http") and not proxies.get("all"):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``response``, refused (unread) beyond ``limit`` bytes."""
    length = response.content_length
    if length is not None:
        if length > limit:
            raise ResponseTooLarge(str(response.url), limit, length)
        return await response.read()
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise ResponseTooLarge(str(response.url), limit, None)
        chunks.append(chunk)
    return b"".join(chunks)


class HTTPClient:
    """One aiohttp session (a pool of at most ``limit`` kept-alive connections) for one event
    loop; a client used from another loop opens a session of its own there."""

    def __init__(
        self,
        *,
        headers: dict[str, str] | None = None,
        timeout_s: float = 120.0,
        limit: int = 8,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        trust_env: bool = False,
    ):
        """``trust_env``: follow the environment's proxy settings (the probe, which may ask an
        HTTPS endpoint behind a proxy; requests go through aiohttp only where none applies)."""
        self.trust_env = trust_env
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **(headers or {}),
        }
        self.timeout_s = timeout_s
        self.limit = limit
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            if self._session is not None:
                abandon(self._session)
            self._loop = loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit, limit_per_host=0),
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=self.trust_env,
            )
        return self._session

    async def post_json(self, url: str, body: dict[str, Any]) -> Any:
        """The decoded JSON answer to a POST of ``body`` to ``url``; raises on status >= 400."""
        data = json.dumps(body, ensure_ascii=False).encode()
        status, headers, payload = await self.exchange("POST", url, data)
        if status >= 400:
            raise HTTPStatusError(status, headers, payload)
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise TransportError(f"answer is not JSON ({exc})", exc) from None

    async def get(self, url: str, *, timeout_s: float | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON or None)`` of a GET of ``url``."""
        status, _, payload = await self.exchange("GET", url, None, timeout_s=timeout_s)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, None

    async def exchange(
        self, method: str, url: str, data: bytes | None, *, timeout_s: float | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        session = self.session()
        # No ``timeout`` argument: the session's (``timeout=None`` would mean none at all).
        options: dict[str, Any] = {}
        if timeout_s is not None:
            options["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with session.request(method, url, data=data, **options) as response:
                payload = await read_bounded(response, self.max_response_bytes)
                status = response.status
                headers = {}
                if status >= 400:
                    headers = {k.lower(): v for k, v in response.headers.items()}
        except (TimeoutError, ResponseTooLarge):
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}", exc) from None
        return status, headers, payload

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._loop is asyncio.get_running_loop():
            await session.close()
        else:
            abandon(session)


def abandon(session: aiohttp.ClientSession) -> None:
    """Drop a session whose event loop is gone (or another's): its sockets went with that loop;
    nothing must be scheduled on it, nor warned about when it is collected."""
    connector = session.connector
    session.detach()
    if connector is not None:
        with contextlib.suppress(Exception):
            connector._close()  # closes the transports now; no await on a dead loop


def run_sync(make: Callable[[], Any]) -> Any:
    """Run the coroutine ``make()`` returns to its end from sync code, even when the calling
    thread already runs an event loop (Jupyter): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
