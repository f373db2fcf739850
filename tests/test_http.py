"""permrank's lean HTTP client, against loopback servers that answer the ways real ones do:
kept-alive or closed connections, chunked bodies, idle connections closed by the server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from permrank.backends.http import PlainHTTPClient, plain_http_applies
from permrank.backends.openai import OpenAIBackend
from permrank.errors import BackendError, ConfigError

ANSWER = {
    "choices": [{"finish_reason": "stop", "message": {"content": "[2] > [1]"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}
MESSAGES = [{"role": "user", "content": "[1] ä\n[2] b"}]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append((self.path, body))
        data = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.server.mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(data), 17):
                piece = data[start : start + 17]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        if self.server.mode == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        if self.server.mode == "one-per-connection":
            self.close_connection = True  # kept-alive by its headers, closed all the same


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str):
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = mode
        self.bodies: list[tuple[str, Any]] = []
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        self.connections += 1
        return super().get_request()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Server] = []

    def start(mode: str = "keep-alive") -> Server:
        srv = Server(mode)
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def url(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


async def ask_many(backend: OpenAIBackend, n: int, sequential: bool = False) -> list[Any]:
    try:
        if sequential:
            return [await backend.complete(MESSAGES, max_tokens=9) for _ in range(n)]
        return list(
            await asyncio.gather(*(backend.complete(MESSAGES, max_tokens=9) for _ in range(n)))
        )
    finally:
        await backend.aclose()


@pytest.mark.parametrize("mode", ["keep-alive", "close", "chunked", "one-per-connection"])
def test_answers_are_read_whatever_the_framing(serve: Any, mode: str) -> None:
    srv = serve(mode)
    backend = OpenAIBackend(url(srv), "m", concurrency=4, max_retries=0)
    assert backend.plain
    completions = asyncio.run(ask_many(backend, 12))
    assert [c.text for c in completions] == ["[2] > [1]"] * 12
    assert all((c.prompt_tokens, c.completion_tokens) == (7, 3) for c in completions)
    path, body = srv.bodies[0]
    assert path == "/v1/chat/completions" and body["messages"] == MESSAGES  # UTF-8 intact
    assert body["model"] == "m" and body["max_tokens"] == 9


def test_connections_are_kept_alive_and_bounded_by_concurrency(serve: Any) -> None:
    srv = serve("keep-alive")
    asyncio.run(ask_many(OpenAIBackend(url(srv), "m", concurrency=3), 30, sequential=True))
    assert srv.connections == 1  # one after the other: one connection, reused
    asyncio.run(ask_many(OpenAIBackend(url(srv), "m", concurrency=3), 30))
    assert srv.connections <= 1 + 3


def test_an_idle_connection_closed_by_the_server_is_replaced_without_a_retry(serve: Any) -> None:
    srv = serve("one-per-connection")
    # No retries allowed: a stale kept-alive connection must not count as a failed attempt.
    backend = OpenAIBackend(url(srv), "m", concurrency=1, max_retries=0)
    completions = asyncio.run(ask_many(backend, 5, sequential=True))
    assert len(completions) == 5 and srv.connections == 5


def test_a_garbled_answer_is_a_connection_failure_retried_then_reported() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    seen = []

    def garble() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            seen.append(conn.recv(65536))
            conn.sendall(b"SPEAK FRIEND\r\n\r\n")
            conn.close()

    threading.Thread(target=garble, daemon=True).start()
    port = listener.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, retry_base_s=0.01)
    try:
        with pytest.raises(BackendError, match=r"after 2 attempt\(s\): connection failed"):
            asyncio.run(ask_many(backend, 1))
    finally:
        listener.close()
    assert len(seen) == 2


def test_a_refused_connection_is_reported_with_the_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nobody listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=0)
    with pytest.raises(BackendError, match=rf"127.0.0.1:{port}/v1/chat/completions.*connection"):
        asyncio.run(ask_many(backend, 1))


def test_which_client_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert plain_http_applies("http://127.0.0.1:8000/v1")
    assert not plain_http_applies("https://api.openai.com/v1")  # TLS: the openai SDK
    assert OpenAIBackend("http://127.0.0.1:8000/v1", "m").describe()["transport"] == "plain http"
    sdk = OpenAIBackend("https://api.example.com/v1", "m")
    assert sdk.describe()["transport"] == "openai sdk"
    assert not OpenAIBackend("http://127.0.0.1:8000/v1", "m", transport="openai").plain
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not plain_http_applies("http://10.1.2.3:8000/v1")  # a proxy applies: the SDK
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert plain_http_applies("http://10.1.2.3:8000/v1")
    with pytest.raises(ConfigError, match="only http://"):
        OpenAIBackend("https://api.example.com/v1", "m", transport="plain")
    with pytest.raises(ConfigError, match="transport must be one of"):
        OpenAIBackend("http://127.0.0.1:8000/v1", "m", transport="carrier-pigeon")


def test_an_absolute_url_is_posted_to_as_it_is(serve: Any) -> None:
    # Methods post to a server's own routes beside /v1 (llama.cpp's /tokenize) by full URL.
    srv = serve("keep-alive")
    root = f"http://127.0.0.1:{srv.server_address[1]}"
    backend = OpenAIBackend(f"{root}/v1", "m")

    async def go() -> Any:
        try:
            return await backend.request(f"{root}/tokenize", {"content": "hi"})
        finally:
            await backend.aclose()

    answer, _ = asyncio.run(go())
    assert answer == ANSWER
    assert srv.bodies == [("/tokenize", {"content": "hi"})]


def test_the_client_refuses_a_url_it_cannot_speak() -> None:
    with pytest.raises(ValueError, match="not a plain http"):
        PlainHTTPClient("https://x.example/v1", headers={}, timeout_s=1, max_idle=1)
