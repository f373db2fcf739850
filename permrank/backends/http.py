"""A lean HTTP/1.1 client for JSON POSTs to a plain ``http://`` endpoint (vLLM, llama.cpp, ...).

The openai SDK and its HTTP stack cost about 3.5 ms of client CPU per request (request building,
a connection pool that inspects every idle socket on each request, a pure-Python HTTP parser).
Against a local server answering hundreds of windows a second, that CPU is the bottleneck of a
run. This client does only what a chat-completions POST needs, on asyncio streams: keep-alive
connections (at most as many as requests in flight), ``Content-Length`` and chunked bodies, one
deadline per request. ``OpenAIBackend`` uses it for ``http://`` URLs that no proxy applies to;
HTTPS endpoints, proxies and ``transport="openai"`` go through the openai SDK.

Failures are exceptions the backend maps and retries like the SDK's: ``HTTPStatusError`` (an
answer with status >= 400, with its headers for ``Retry-After``), ``TransportError`` (refused,
reset or garbled connections) and ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from typing import Any

MAX_HEADER_BYTES = 64 * 1024


class TransportError(Exception):
    """The connection failed before a whole answer came back (refused, reset, garbled)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


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


def _origin(url: str) -> tuple[tuple[str, int, str], str]:
    """``((host, port, Host header), path)`` of an ``http://`` URL, the path without its end
    slash (a query string stays on it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not a plain http:// URL: {url!r}")
    path = parts.path.rstrip("/") + (f"?{parts.query}" if parts.query else "")
    return (parts.hostname, parts.port or 80, parts.netloc.rpartition("@")[2]), path


class _Connection:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.reused = False

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # its event loop is already closed: the socket went with it
            pass


class PlainHTTPClient:
    """POSTs JSON to ``base_url + route`` over kept-alive connections; one event loop only."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout_s: float,
        max_idle: int,
    ):
        self.origin, self.prefix = _origin(base_url)
        lines = ["Content-Type: application/json", "Accept: application/json"]
        self._headers = "\r\n".join([*lines, *(f"{k}: {v}" for k, v in headers.items())])
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int, str], list[_Connection]] = {}

    async def post_json(self, route: str, body: dict[str, Any]) -> Any:
        """The decoded JSON answer to a POST of ``body`` to ``base_url + route`` (or to
        ``route`` itself when it is an absolute ``http://`` URL); raises on status >= 400."""
        if route.startswith("http://"):
            origin, path = _origin(route)
        else:
            origin, path = self.origin, self.prefix + route
        data = json.dumps(body, ensure_ascii=False).encode()
        head = (
            f"POST {path or '/'} HTTP/1.1\r\nHost: {origin[2]}\r\n{self._headers}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(self.timeout_s):
            status, headers, payload = await self._exchange(origin, head + data)
        if status >= 400:
            raise HTTPStatusError(status, headers, payload)
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise TransportError(f"answer is not JSON ({exc})", exc) from None

    async def _exchange(
        self, origin: tuple[str, int, str], request: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        idle = self._idle.setdefault(origin, [])
        while True:
            connection = await self._acquire(origin, idle)
            try:
                connection.writer.write(request)
                status, headers, payload, keep = await self._read_response(connection.reader)
            except (
                OSError,
                ValueError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
            ) as exc:
                connection.close()
                if isinstance(exc, TimeoutError):
                    raise
                nothing_back = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                if connection.reused and (nothing_back or isinstance(exc, ConnectionError)):
                    continue  # the server had closed this idle connection: a fresh one
                raise TransportError(f"{type(exc).__name__}: {exc}", exc) from None
            except BaseException:  # cancelled or timed out mid-answer: never reuse it
                connection.close()
                raise
            if keep and len(idle) < self.max_idle:
                connection.reused = True
                idle.append(connection)
            else:
                connection.close()
            return status, headers, payload

    @staticmethod
    async def _acquire(origin: tuple[str, int, str], idle: list[_Connection]) -> _Connection:
        while idle:
            connection = idle.pop()
            if connection.usable:
                return connection
            connection.close()
        try:
            reader, writer = await asyncio.open_connection(
                origin[0], origin[1], limit=MAX_HEADER_BYTES
            )
        except TimeoutError:
            raise
        except OSError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}", exc) from None
        return _Connection(reader, writer)

    @staticmethod
    async def _read_response(
        reader: asyncio.StreamReader,
    ) -> tuple[int, dict[str, str], bytes, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise TransportError(f"not an HTTP answer: {status_line[:80]!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            payload = b"".join(chunks)
        elif "content-length" in headers:
            payload = await reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304) or 100 <= status < 200:
            payload = b""
        else:
            payload = await reader.read()  # until the server closes
            keep = False
        return status, headers, payload, keep

    async def aclose(self) -> None:
        idle = [c for pool in self._idle.values() for c in pool]
        self._idle = {}
        for connection in idle:
            connection.close()
        for connection in idle:
            try:
                await connection.writer.wait_closed()
            except OSError:
                pass
