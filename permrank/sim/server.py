"""A simulated LLM server: OpenAI-compatible, on loopback, answering from the qrels.

``permrank simulate --data ../shared/data/trec-dl19 --port 8000`` serves ``/v1/chat/completions``
(and ``/v1/completions``, ``/v1/responses`` in the Responses API's shape, ``/v1/models``, and
the rerank APIs of ``permrank.sim.rerank``: ``/v1/rerank``, TEI's ``/rerank``, ``/v1/score``). It
finds the query and the passages in the prompt by their *text*, not by knowing the template:
the query is the longest known query text found in the prompt, the passages are that query's
candidates found in it, in order of appearance (identifier 1 first). MS MARCO repeats passages
under several docids, so passages are matched by text. The answer orders them by qrels grade
(ties keep the shown order), then applies seeded noise (``permrank.sim.noise``: swaps, position
bias, missed passages, limited attention), as ``[3] > [1] > ...``. Latency is configurable, so
the whole pipeline can be run and timed with no GPU. ``GET /stats`` reports what was asked
(requests, per query, sampling parameters seen).

The judge itself (``judge_order``) is a pure function; the HTTP layer is thin.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from permrank.sim.noise import Noise, judge_order
from permrank.sim.state import Corpus, SimulatorState, completion_payload, find_passages

__all__ = ["Corpus", "Noise", "Simulator", "SimulatorState", "find_passages", "judge_order"]

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: without TCP_NODELAY the body waits for
    # the client's delayed ACK of the headers, 40 ms added to every answer.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("simulator: " + format, *args)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        state = self.server.state
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": state.model,
                            "object": "model",
                            "owned_by": "permrank",
                            "max_model_len": 8192,
                        }
                    ],
                },
            )
        elif path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        elif path in ("/stats", "/v1/stats"):
            self._send(200, state.stats())
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        state = self.server.state
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        from permrank.sim.rerank import RERANK_PATHS, SCORE_PATHS, respond_rerank

        if path in RERANK_PATHS or path in SCORE_PATHS:  # a learned head's scores
            if state.faults is not None and state.faults.intercept(self, body, path):
                return
            status, answer = respond_rerank(state, body, path)
            if state.latency_s > 0:
                time.sleep(state.latency_s)
            self._send(status, answer)
            return
        if path not in (
            "/v1/chat/completions",
            "/chat/completions",
            "/v1/completions",
            "/completions",
            "/v1/responses",
            "/responses",
        ):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        if state.faults is not None and state.faults.intercept(self, body, path):
            return
        from permrank.sim.methods import respond

        payload = respond(state, body, path)  # scoring methods: answers with logprobs
        if payload is not None:
            time.sleep(state.latency_s)
            self._send(200, payload)
            return
        text, prompt_tokens, completion_tokens = state.answer(body)
        if state.latency_s > 0:
            time.sleep(state.latency_s)
        payload = completion_payload(state, body, path, text, prompt_tokens, completion_tokens)
        self._send(200, payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: SimulatorState):
        super().__init__(address, _Handler)
        self.state = state


class Simulator:
    """A running simulator on loopback: ``with Simulator(corpus) as sim: sim.base_url``."""

    def __init__(
        self,
        corpus: Corpus,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        noise: Noise | None = None,
        latency_s: float = 0.0,
        faults: Any = None,
    ):
        self.state = SimulatorState(
            corpus=corpus, noise=noise or Noise(), latency_s=latency_s, faults=faults
        )
        self.server = _Server((host, port), self.state)
        self.thread: threading.Thread | None = None
        if faults is not None and hasattr(faults, "bind"):
            faults.bind(self)  # a fault may restart the server (see permrank.sim.faults)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.server.server_address[0]!s}:{self.port}/v1"

    def start(self) -> Simulator:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def restart(self, down_s: float) -> None:
        """Stop listening (connections are refused) for ``down_s`` seconds, then listen again
        on the same address, as a server that restarts does. Answers in progress finish."""
        address = self.server.server_address[:2]
        self.stop()
        time.sleep(down_s)
        self.server = _Server(address, self.state)  # type: ignore[arg-type]
        self.start()

    def wait(self) -> None:
        """Serve until the process is stopped (restarts included)."""
        while True:
            time.sleep(3600)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
