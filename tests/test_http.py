"""permrank's HTTP (aiohttp) against raw-socket loopback servers that speak legal but unusual
HTTP/1.1: interim 1xx answers before every answer, chunked bodies, ``Connection: close``, kept-alive
connections, and idle connections the server closes. Rankings must come out as through the
plain simulator."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from permrank.backends.client import plain_http_applies
from permrank.backends.openai import OpenAIBackend
from permrank.backends.tokenizer import ServerTokenizer
from permrank.core.errors import BackendError, ConfigError
from permrank.engine.reranker import Reranker
from permrank.servers.process import free_port
from permrank.sim.server import Corpus, Simulator
from permrank.sim.state import SimulatorState, completion_payload

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"
ANSWER = {
    "choices": [{"finish_reason": "stop", "message": {"content": "[2] > [1]"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}
MESSAGES = [{"role": "user", "content": "[1] ä\n[2] b"}]
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Answer = Callable[[str, str, Any], tuple[int, Any]]


def fixed_answer(method: str, path: str, body: Any) -> tuple[int, Any]:
    return 200, ANSWER


class RawServer:
    """An HTTP/1.1 server written on sockets, so that it answers exactly as told.

    ``interim``: bytes sent before every answer (1xx responses). ``framing``: "length" or
    "chunked". ``close``: "never" (kept alive), "header" (``Connection: close``, then closed),
    "after" (closed after each answer with no word), "idle" (closed when the connection has been
    idle ``idle_s``), "second" (the second request of a connection is read, then the connection
    is closed without an answer)."""

    def __init__(
        self,
        answer: Answer = fixed_answer,
        *,
        interim: bytes = b"",
        framing: str = "length",
        close: str = "never",
        idle_s: float = 0.05,
        delay: Callable[[str, Any], float] | None = None,
        body_bytes: int | None = None,
    ):
        self.answer = answer
        self.interim = interim
        self.framing = framing
        self.close = close
        self.idle_s = idle_s
        self.delay = delay
        self.body_bytes = body_bytes
        self.connections = 0
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        served = 0
        try:
            while True:
                if self.close == "idle" and served:
                    conn.settimeout(self.idle_s)
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        return  # idle too long: closed, as servers do
                    if not data:
                        return
                    buffer += data
                conn.settimeout(None)
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                raw, buffer = buffer[:length], buffer[length:]
                body = json.loads(raw) if raw else None
                with self.lock:
                    self.requests.append((method, path, body))
                served += 1
                if self.close == "second" and served == 2:
                    return  # read, never answered: the client must ask again elsewhere
                if self.delay is not None:
                    time.sleep(self.delay(path, body))
                status, payload = self.answer(method, path, body)
                conn.sendall(self._response(status, payload))
                if self.close in ("header", "after"):
                    return
        except OSError:
            return
        finally:
            conn.close()

    def _response(self, status: int, payload: Any) -> bytes:
        data = json.dumps(payload).encode()
        if self.body_bytes is not None:
            data = b" " * self.body_bytes + data
        head = [f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}"]
        head.append("Content-Type: application/json")
        if self.close == "header":
            head.append("Connection: close")
        if self.framing == "chunked":
            head.append("Transfer-Encoding: chunked")
            pieces = [data[i : i + 17] for i in range(0, len(data), 17)]
            body = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in pieces) + (
                b"0\r\nX-Trailer: yes\r\n\r\n"
            )
        else:
            head.append(f"Content-Length: {len(data)}")
            body = data
        return self.interim + ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def stop(self) -> None:
        self.listener.close()


def raw_servers() -> Iterator[Callable[..., RawServer]]:
    """Start RawServers on demand; all stopped at the end."""
    servers: list[RawServer] = []

    def start(*args: Any, **kwargs: Any) -> RawServer:
        servers.append(RawServer(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    yield from raw_servers()


async def ask_many(backend: OpenAIBackend, n: int, sequential: bool = False) -> list[Any]:
    try:
        if sequential:
            return [await backend.complete(MESSAGES, max_tokens=9) for _ in range(n)]
        return list(
            await asyncio.gather(*(backend.complete(MESSAGES, max_tokens=9) for _ in range(n)))
        )
    finally:
        await backend.aclose()


SHAPES = {
    "103 early hints": dict(interim=EARLY_HINTS),
    "100 continue and 103": dict(interim=CONTINUE + EARLY_HINTS),
    "103 and chunked": dict(interim=EARLY_HINTS, framing="chunked"),
    "chunked": dict(framing="chunked"),
    "connection close": dict(close="header"),
    "closed after each answer": dict(close="after"),
    "keep-alive": dict(),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_answers_are_read_whatever_the_framing(raw: Any, shape: str) -> None:
    srv = raw(**SHAPES[shape])
    # A server that closes a connection after its answer without saying so (no `Connection:
    # close`) races the client's next request on it: that request is lost and re-sent at once,
    # counted as a retry; under load the re-sent one may meet another such connection, so this
    # shape gets a few retries.
    silent_close = SHAPES[shape].get("close") == "after"
    backend = OpenAIBackend(srv.base_url, "m", concurrency=4, max_retries=4 if silent_close else 0)
    assert backend.plain
    completions = asyncio.run(ask_many(backend, 12))
    assert [c.text for c in completions] == ["[2] > [1]"] * 12
    assert all((c.prompt_tokens, c.completion_tokens) == (7, 3) for c in completions)
    assert len(srv.requests) == 12  # one request each: no answer read for another
    assert sum(c.retries for c in completions) <= (12 if shape == "closed after each answer" else 0)
    _, path, body = srv.requests[0]
    assert path == "/v1/chat/completions" and body["messages"] == MESSAGES  # UTF-8 intact
    assert body["model"] == "m" and body["max_tokens"] == 9


def simulated(state: SimulatorState) -> Answer:
    """The simulator's answers, served by a RawServer."""

    def answer(method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET":
            return 200, {"object": "list", "data": [{"id": state.model, "owned_by": "permrank"}]}
        text, prompt_tokens, completion_tokens = state.answer(body)
        return 200, completion_payload(state, body, path, text, prompt_tokens, completion_tokens)

    return answer


def rankings_through(base_url: str, model: str) -> tuple[dict[str, list[str]], Any]:
    from permrank.engine.usage import total_usage
    from permrank.runs.io import read_requests

    with Reranker(model=model, base_url=base_url, concurrency=4) as reranker:
        rankings = reranker.rerank_batch(list(read_requests(DL19_5Q / "candidates.jsonl")))
    assert all(r.error is None for r in rankings)
    return {r.query.qid: r.docids for r in rankings}, total_usage(rankings)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[str]]:
    corpus = Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")
    with Simulator(corpus) as sim:
        return rankings_through(sim.base_url, sim.state.model)[0]


LEGAL = {
    "103 early hints": dict(interim=EARLY_HINTS),
    "100 continue and 103, chunked": dict(interim=CONTINUE + EARLY_HINTS, framing="chunked"),
    "connection close": dict(close="header"),
    "idle connections closed": dict(close="idle", idle_s=0.001),
}


@pytest.mark.parametrize("shape", LEGAL, ids=list(LEGAL))
def test_dl19_reranks_alike_through_legal_http(
    raw: Any, reference: dict[str, list[str]], shape: str
) -> None:
    corpus = Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")
    state = SimulatorState(corpus=corpus)
    srv = raw(simulated(state), **LEGAL[shape])
    got, usage = rankings_through(srv.base_url, state.model)
    assert got == reference
    assert state.unmatched == 0 and state.requests > 5
    # A request lost on a connection the server closed was sent again, and counted as a retry
    # (the server may or may not have read it before closing).
    posts = sum(1 for method, _, _ in srv.requests if method == "POST")
    assert usage.calls <= posts <= usage.calls + usage.retries
    if shape != "idle connections closed":
        assert usage.retries == 0


def test_connections_are_kept_alive_and_bounded_by_concurrency(raw: Any) -> None:
    srv = raw()
    asyncio.run(ask_many(OpenAIBackend(srv.base_url, "m", concurrency=3), 30, sequential=True))
    assert srv.connections == 1  # one after the other: one connection, reused
    asyncio.run(ask_many(OpenAIBackend(srv.base_url, "m", concurrency=3), 30))
    assert srv.connections <= 1 + 3


def test_an_idle_connection_closed_by_the_server_is_replaced(raw: Any) -> None:
    srv = raw(close="idle", idle_s=0.02)
    backend = OpenAIBackend(srv.base_url, "m", concurrency=1, max_retries=0)

    async def slowly() -> list[Any]:
        try:
            out = []
            for _ in range(4):
                out.append(await backend.complete(MESSAGES, max_tokens=9))
                await asyncio.sleep(0.1)  # longer than the server keeps an idle connection
            return out
        finally:
            await backend.aclose()

    completions = asyncio.run(slowly())
    assert len(completions) == 4 and srv.connections == 4


def test_a_request_sent_again_on_a_fresh_connection_counts_as_a_retry(raw: Any) -> None:
    srv = raw(close="second")  # the second request of a connection dies unanswered
    backend = OpenAIBackend(srv.base_url, "m", concurrency=1, max_retries=2, retry_base_s=0.01)
    first, second = asyncio.run(ask_many(backend, 2, sequential=True))
    assert (first.retries, second.retries) == (0, 1)
    assert second.text == "[2] > [1]" and srv.connections == 2 and len(srv.requests) == 3


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_answer_over_max_response_bytes_is_a_clear_error(raw: Any, framing: str) -> None:
    srv = raw(framing=framing, body_bytes=2_000_000)
    backend = OpenAIBackend(
        srv.base_url, "m", max_retries=3, retry_base_s=0.01, max_response_bytes=1_000_000
    )
    with pytest.raises(BackendError, match=r"larger than --max-response-bytes \(1000000 bytes"):
        asyncio.run(ask_many(backend, 1))
    assert len(srv.requests) == 1  # not retried: it would be as large again


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
    assert OpenAIBackend("http://127.0.0.1:8000/v1", "m").describe()["transport"] == "aiohttp"
    sdk = OpenAIBackend("https://api.example.com/v1", "m")
    assert sdk.describe()["transport"] == "openai sdk"
    assert not OpenAIBackend("http://127.0.0.1:8000/v1", "m", transport="openai").plain
    assert OpenAIBackend("http://127.0.0.1:8000/v1", "m", transport="aiohttp").plain
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not plain_http_applies("http://10.1.2.3:8000/v1")  # a proxy applies: the SDK
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert plain_http_applies("http://10.1.2.3:8000/v1")
    with pytest.raises(ConfigError, match="only http://"):
        OpenAIBackend("https://api.example.com/v1", "m", transport="plain")
    with pytest.raises(ConfigError, match="transport must be one of"):
        OpenAIBackend("http://127.0.0.1:8000/v1", "m", transport="carrier-pigeon")


def test_the_openai_sdk_is_imported_only_when_an_endpoint_needs_it(raw: Any) -> None:
    srv = raw()
    code = (
        "import asyncio, sys\n"
        "from permrank.backends.openai import OpenAIBackend\n"
        "import permrank.engine.pipeline, permrank.backends.probe, permrank.backends.cache\n"
        f"b = OpenAIBackend({srv.base_url!r}, 'm')\n"
        "async def go():\n"
        "    try:\n"
        "        return await b.complete([{'role': 'user', 'content': 'x'}], max_tokens=3)\n"
        "    finally:\n"
        "        await b.aclose()\n"
        "asyncio.run(go())\n"
        "print('openai' in sys.modules, 'httpx' in sys.modules)\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.split() == ["False", "False"]


def test_an_absolute_url_is_posted_to_as_it_is(raw: Any) -> None:
    # Methods post to a server's own routes beside /v1 (llama.cpp's /tokenize) by full URL.
    srv = raw()
    root = f"http://127.0.0.1:{srv.port}"
    backend = OpenAIBackend(f"{root}/v1", "m")

    async def go() -> Any:
        try:
            return await backend.request(f"{root}/tokenize", {"content": "hi"})
        finally:
            await backend.aclose()

    answer, _ = asyncio.run(go())
    assert answer == ANSWER
    assert srv.requests == [("POST", "/tokenize", {"content": "hi"})]


def test_latency_is_wire_time_and_waiting_is_queued_time(raw: Any) -> None:
    srv = raw(delay=lambda path, body: 0.2)
    backend = OpenAIBackend(srv.base_url, "m", concurrency=1, max_retries=0)
    completions = asyncio.run(ask_many(backend, 3))  # one slot: the others wait their turn
    latencies = sorted(c.latency_s for c in completions)
    queued = sorted(c.queued_s for c in completions)
    assert all(0.18 <= x < 0.4 for x in latencies)  # each its own 0.2 s on the wire
    assert queued[0] < 0.1 and 0.15 <= queued[1] < 0.4 and 0.35 <= queued[2] < 0.8


def test_the_tokenizer_sends_again_a_request_lost_on_a_closed_connection(raw: Any) -> None:
    """llama.cpp closes a kept-alive connection that stays idle while a long answer is written;
    the tokenizer's next request on it is sent again on a fresh connection (tokenizing is
    idempotent), not a failed query. A bench run lost a query that way (1.5B, listwise)."""
    srv = raw(lambda method, path, body: (200, {"tokens": [1, 2, 3]}), close="second")
    tokenizer = ServerTokenizer(f"http://127.0.0.1:{srv.port}", kind="llama.cpp", model="m")

    async def two() -> list[tuple[int, ...]]:
        try:
            return [await tokenizer.aencode("first"), await tokenizer.aencode("second")]
        finally:
            await tokenizer.aclose()

    assert asyncio.run(two()) == [(1, 2, 3), (1, 2, 3)]
    assert srv.connections == 2 and [r[1] for r in srv.requests] == ["/tokenize"] * 3


def test_the_tokenizer_does_not_hide_a_server_that_is_gone() -> None:
    port = free_port()
    tokenizer = ServerTokenizer(f"http://127.0.0.1:{port}", kind="llama.cpp", model="m")

    async def once() -> None:
        try:
            await tokenizer.aencode("text")
        finally:
            await tokenizer.aclose()

    with pytest.raises(BackendError, match="tokenizer failed.*is the server still up"):
        asyncio.run(once())
