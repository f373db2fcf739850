"""OpenAIBackend against a loopback server that fails on purpose, then answers."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from permrank.backends.openai import OpenAIBackend, retry_after_seconds
from permrank.core.errors import BackendError, ConfigError

SECRET = "sk-test-0123456789-do-not-leak"
MESSAGES = [{"role": "user", "content": "[1] a\n[2] b"}]


@dataclass
class Script:
    """What the server does with each POST, in order; once exhausted it answers."""

    faults: list[tuple[Any, ...]] = field(default_factory=list)
    answer_delay_s: float = 0.0
    always: tuple[Any, ...] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrivals: list[float] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def next_fault(self) -> tuple[Any, ...] | None:
        with self.lock:
            if self.faults:
                return self.faults.pop(0)
            return self.always


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        script = self.server.script
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with script.lock:
            script.arrivals.append(time.perf_counter())
            script.bodies.append(body)
            script.authorizations.append(self.headers.get("Authorization", ""))
            script.in_flight += 1
            script.max_in_flight = max(script.max_in_flight, script.in_flight)
        try:
            fault = script.next_fault()
            if fault is None:
                time.sleep(script.answer_delay_s)
                self.reply(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "[2] > [1]"},
                            }
                        ],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 5},
                    },
                )
            elif fault[0] == "status":
                _, status, headers = fault
                self.reply(status, {"error": {"message": f"injected {status}"}}, headers)
            elif fault[0] == "drop":  # close the connection without a word
                self.close_connection = True
            elif fault[0] == "stall":  # answer later than the client waits
                time.sleep(fault[1])
                self.close_connection = True
        finally:
            with script.lock:
                script.in_flight -= 1


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Script())
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True, params=["auto", "openai"], ids=["plain-http", "openai-sdk"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every test runs through both HTTP clients: aiohttp (what ``auto`` picks for a loopback
    ``http://`` URL) and the openai SDK."""
    TRANSPORT[0] = request.param
    return request.param


TRANSPORT = ["auto"]


def backend_for(srv: Server, **options: Any) -> OpenAIBackend:
    options.setdefault("transport", TRANSPORT[0])
    options.setdefault("retry_base_s", 0.01)
    options.setdefault("timeout_s", 5.0)
    return OpenAIBackend(
        f"http://127.0.0.1:{srv.server_address[1]}/v1",
        "test-model",
        api_key_env="PERMRANK_TEST_KEY",
        **options,
    )


async def complete_once(backend: OpenAIBackend, **kwargs: Any):
    try:
        return await backend.complete(MESSAGES, max_tokens=kwargs.pop("max_tokens", 32), **kwargs)
    finally:
        await backend.aclose()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERMRANK_TEST_KEY", SECRET)


@pytest.mark.parametrize(
    "fault",
    [
        ("status", 429, {}),
        ("status", 500, {}),
        ("status", 502, {}),
        ("status", 503, {}),
        ("drop",),
        ("stall", 1.0),
    ],
    ids=["429", "500", "502", "503", "dropped connection", "read timeout"],
)
def test_retries_then_answers(server: Server, fault: tuple[Any, ...]) -> None:
    server.script.faults = [fault, fault]
    backend = backend_for(server, max_retries=3, timeout_s=0.5)
    completion = asyncio.run(complete_once(backend))
    assert completion.text == "[2] > [1]"
    assert (completion.prompt_tokens, completion.completion_tokens) == (11, 5)
    assert len(server.script.bodies) == 3  # two failures, then the answer
    assert all(a == f"Bearer {SECRET}" for a in server.script.authorizations)


def test_retry_after_is_honoured(server: Server) -> None:
    server.script.faults = [("status", 429, {"Retry-After": "1"})]
    backend = backend_for(server, max_retries=2, retry_base_s=0.01)
    asyncio.run(complete_once(backend))
    first, second = server.script.arrivals
    assert second - first >= 0.95  # waited as asked, not the 10 ms backoff


def test_retry_after_ms_is_honoured(server: Server) -> None:
    server.script.faults = [("status", 429, {"retry-after-ms": "600"})]
    asyncio.run(complete_once(backend_for(server, max_retries=2)))
    first, second = server.script.arrivals
    assert 0.55 <= second - first < 5


def test_retry_after_is_capped(server: Server) -> None:
    server.script.faults = [("status", 503, {"Retry-After": "3600"})]
    asyncio.run(complete_once(backend_for(server, max_retries=2, retry_max_s=0.3)))
    first, second = server.script.arrivals
    assert 0.25 <= second - first < 3


def test_retry_after_forms() -> None:
    class Response:
        def __init__(self, headers: dict[str, str]):
            self.headers = headers

    class Failure(Exception):
        def __init__(self, headers: dict[str, str]):
            self.response = Response(headers)

    assert retry_after_seconds(Failure({"retry-after": "7"})) == 7.0
    assert retry_after_seconds(Failure({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(Failure({})) is None
    assert retry_after_seconds(Failure({"retry-after": "soon"})) is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(Failure({"retry-after": when})) <= 31
    assert retry_after_seconds(ValueError("no response")) is None


@pytest.mark.parametrize(
    ("always", "described"),
    [
        (("status", 503, {}), "HTTP 503"),
        (("status", 429, {}), "HTTP 429"),
        (("drop",), "connection failed"),
        (("stall", 1.0), "timed out"),
    ],
    ids=["503", "429", "dropped connection", "read timeout"],
)
def test_gives_up_after_max_retries(
    server: Server, always: tuple[Any, ...], described: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.script.always = always
    backend = backend_for(server, max_retries=2, timeout_s=0.4)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BackendError) as info:
        asyncio.run(complete_once(backend))
    message = str(info.value)
    assert len(server.script.bodies) == 3
    assert f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions" in message
    assert "after 3 attempt(s)" in message
    assert described in message
    assert SECRET not in message
    assert SECRET not in caplog.text
    assert "attempt 1 failed" in caplog.text  # each retry is logged


def test_client_errors_are_not_retried(server: Server) -> None:
    server.script.always = ("status", 400, {})
    with pytest.raises(BackendError, match=r"after 1 attempt\(s\): HTTP 400"):
        asyncio.run(complete_once(backend_for(server, max_retries=5)))
    assert len(server.script.bodies) == 1


def test_sampling_parameters_are_sent(server: Server) -> None:
    asyncio.run(complete_once(backend_for(server), max_tokens=77, temperature=0.0, seed=1234))
    asyncio.run(complete_once(backend_for(server), max_tokens=12, temperature=0.7))
    with_seed, without_seed = server.script.bodies
    assert with_seed["model"] == "test-model"
    assert with_seed["messages"] == MESSAGES
    assert with_seed["temperature"] == 0.0
    assert with_seed["max_tokens"] == 77
    assert with_seed["seed"] == 1234
    assert without_seed["temperature"] == 0.7 and without_seed["max_tokens"] == 12
    assert "seed" not in without_seed


def test_extra_fields_are_sent(server: Server) -> None:
    asyncio.run(complete_once(backend_for(server), extra={"stop": ["\n\n"], "top_p": 1.0}))
    (body,) = server.script.bodies
    assert body["stop"] == ["\n\n"] and body["top_p"] == 1.0


async def many(backend: OpenAIBackend, count: int) -> list[Any]:
    try:
        return await asyncio.gather(
            *(backend.complete(MESSAGES, max_tokens=8) for _ in range(count))
        )
    finally:
        await backend.aclose()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_caps_requests_in_flight(server: Server, concurrency: int) -> None:
    server.script.answer_delay_s = 0.5
    answers = asyncio.run(many(backend_for(server, concurrency=concurrency), 3 * concurrency + 1))
    assert len(answers) == 3 * concurrency + 1
    assert server.script.max_in_flight == concurrency


def test_rps_caps_request_rate(server: Server) -> None:
    rps = 10.0
    asyncio.run(many(backend_for(server, concurrency=16, rps=rps), 8))
    arrivals = sorted(server.script.arrivals)
    assert len(arrivals) == 8
    # Eight requests at 10 a second span at least 0.7 s (a busy machine only makes it longer).
    assert arrivals[-1] - arrivals[0] >= 7 / rps * 0.85


def test_unlimited_rps_is_not_throttled(server: Server) -> None:
    server.script.answer_delay_s = 0.5
    asyncio.run(many(backend_for(server, concurrency=8), 8))
    assert server.script.max_in_flight >= 5  # in parallel, not one after another


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"rps": 0}, "rps must be positive"),
    ],
)
def test_impossible_limits_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", **options)
    with pytest.raises(ConfigError, match="--base-url"):
        OpenAIBackend("", "m")


def test_describe_never_holds_the_key(server: Server) -> None:
    described = json.dumps(backend_for(server).describe())
    assert SECRET not in described
    assert "PERMRANK_TEST_KEY" in described
