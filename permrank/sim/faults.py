"""Fault injection for the simulator: the failures a real endpoint has, on demand.

``Faults`` plugs into ``Simulator(..., faults=Faults(...))`` (``permrank simulate --fail-first 3
...`` on the command line). Completion requests are numbered as they arrive (0, 1, 2, ...,
retries included); a fault given as "the first N" hits requests 0..N-1. When several faults
apply to one request the first of this list wins:

- ``restart_after`` N: at request N the server stops listening for ``restart_for_s`` seconds
  (new connections are refused, requests on open connections are cut), then listens again;
- ``cut_first`` N: the connection is closed without an answer (``cut_mode`` "reset" sends a TCP
  reset, "close" a plain close);
- ``fail_first`` N, ``fail_rate`` p (seeded), ``fail_queries`` (every request about these qids):
  an HTTP error ``status`` (500, 502, 503, 429...), with ``Retry-After: retry_after`` if given;
- ``empty_first`` N: an answer with empty content;
- ``truncate_first`` N: the answer cut in half, ``finish_reason: "length"``;
- ``garbage_first`` N: prose with no identifier in it.

``delay_s`` (for the first ``delay_first`` requests, or all when 0) is added before answering,
to make clients time out. ``describe()`` counts what was injected (also in ``GET /stats``).
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from permrank.core.errors import ConfigError

GARBAGE = (
    "These passages cover several topics, and relevance depends on what the user means. "
    "More context would help decide."
)


@dataclass
class Faults:
    fail_first: int = 0
    fail_rate: float = 0.0
    fail_queries: frozenset[str] = frozenset()
    status: int = 500
    retry_after: float | None = None
    delay_s: float = 0.0
    delay_first: int = 0
    cut_first: int = 0
    cut_mode: Literal["reset", "close"] = "reset"
    restart_after: int | None = None
    restart_for_s: float = 1.0
    empty_first: int = 0
    truncate_first: int = 0
    garbage_first: int = 0
    seed: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    _seen: int = 0
    _down_until: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _simulator: Any = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ConfigError(f"fail_rate must be between 0 and 1 (got {self.fail_rate})")
        if not 400 <= self.status <= 599:
            raise ConfigError(f"a fault's status is an HTTP error, 400-599 (got {self.status})")
        if self.cut_mode not in ("reset", "close"):
            raise ConfigError(f"cut_mode must be 'reset' or 'close' (got {self.cut_mode!r})")

    def active(self) -> bool:
        """Whether any fault is switched on."""
        return bool(
            self.fail_first
            or self.fail_rate
            or self.fail_queries
            or self.delay_s
            or self.cut_first
            or self.restart_after is not None
            or self.empty_first
            or self.truncate_first
            or self.garbage_first
        )

    def bind(self, simulator: Any) -> None:
        """The simulator a ``restart`` fault restarts."""
        self._simulator = simulator

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"requests_seen": self._seen, "injected": dict(self.injected)}

    def _count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def _choose(self, handler: Any, body: dict[str, Any]) -> str | None:
        """Which fault (if any) request number ``n`` gets; counts it."""
        with self._lock:
            n = self._seen
            self._seen += 1
            kind: str | None = None
            if time.monotonic() < self._down_until:
                kind = "cut"
            elif self.restart_after is not None and n == self.restart_after:
                kind = "restart"
                self._down_until = time.monotonic() + self.restart_for_s
            elif n < self.cut_first:
                kind = "cut"
            elif n < self.fail_first:
                kind = "fail"
            elif self.fail_rate and random.Random(f"{self.seed}:{n}").random() < self.fail_rate:
                kind = "fail"
            elif n < self.empty_first:
                kind = "empty"
            elif n < self.truncate_first:
                kind = "truncate"
            elif n < self.garbage_first:
                kind = "garbage"
            delay = self.delay_s if (self.delay_first == 0 or n < self.delay_first) else 0.0
            if delay > 0:
                self._count("delay")
        if kind is None and self.fail_queries and _query_of(handler, body) in self.fail_queries:
            kind = "fail"
        if kind is not None:
            with self._lock:
                self._count(kind)
        if delay > 0:
            time.sleep(delay)
        return kind

    def intercept(self, handler: Any, body: dict[str, Any], path: str) -> bool:
        """The simulator's hook: answer the request here (a fault) and return True, or let the
        simulator answer it (return False)."""
        kind = self._choose(handler, body)
        if kind is None:
            return False
        if kind == "restart":
            if self._simulator is not None:
                threading.Thread(
                    target=self._simulator.restart, args=(self.restart_for_s,), daemon=True
                ).start()
            _cut(handler, "reset")
        elif kind == "cut":
            _cut(handler, self.cut_mode)
        elif kind == "fail":
            headers = {}
            if self.retry_after is not None:
                headers["Retry-After"] = f"{self.retry_after:g}"
            handler._send(
                self.status,
                {"error": {"message": f"simulated fault: HTTP {self.status}", "type": "fault"}},
                headers,
            )
        else:
            _answer_badly(handler, body, path, kind)
        return True


def _query_of(handler: Any, body: dict[str, Any]) -> str | None:
    from permrank.sim.state import _norm, prompt_text

    query = handler.server.state.corpus.find_query(_norm(prompt_text(body)))
    return query.qid if query is not None else None


def _cut(handler: Any, mode: str) -> None:
    """Close the connection without an answer."""
    sock = handler.connection
    handler.close_connection = True
    try:
        if mode == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    except OSError:
        pass


def _answer_badly(handler: Any, body: dict[str, Any], path: str, kind: str) -> None:
    from permrank.sim.state import completion_payload

    state = handler.server.state
    text, prompt_tokens, completion_tokens = state.answer(body)
    finish_reason = "stop"
    if kind == "empty":
        text, completion_tokens = "", 0
    elif kind == "truncate":
        text = text[: len(text) // 2]
        completion_tokens = int(body.get("max_tokens") or completion_tokens)
        finish_reason = "length"
    elif kind == "garbage":
        text = GARBAGE
    handler._send(
        200,
        completion_payload(
            state, body, path, text, prompt_tokens, completion_tokens, finish_reason
        ),
    )


def add_fault_options(parser: argparse.ArgumentParser) -> None:
    """``permrank simulate`` switches that make the simulator fail on purpose."""
    g = parser.add_argument_group(
        "faults",
        "requests are numbered as they arrive (retries included); 'first N' hits 0..N-1",
    )
    g.add_argument("--fail-first", type=int, default=0, metavar="N", help="fail the first N")
    g.add_argument(
        "--fail-rate", type=float, default=0.0, metavar="P", help="fail a fraction P (seeded)"
    )
    g.add_argument(
        "--fail-query",
        action="append",
        default=[],
        metavar="QID",
        help="fail every request about this query (repeatable)",
    )
    g.add_argument(
        "--fail-status",
        type=int,
        default=500,
        metavar="CODE",
        help="HTTP status of a failure: 500, 502, 503, 429... (500)",
    )
    g.add_argument(
        "--retry-after", type=float, default=None, metavar="S", help="send Retry-After: S"
    )
    g.add_argument("--delay", type=float, default=0.0, metavar="S", help="wait S before answering")
    g.add_argument(
        "--delay-first", type=int, default=0, metavar="N", help="delay only the first N (0: all)"
    )
    g.add_argument(
        "--cut-first", type=int, default=0, metavar="N", help="drop the connection of the first N"
    )
    g.add_argument(
        "--cut-mode", choices=("reset", "close"), default="reset", help="how to drop it (reset)"
    )
    g.add_argument(
        "--restart-after",
        type=int,
        default=None,
        metavar="N",
        help="at request N stop listening for --restart-for seconds, then come back",
    )
    g.add_argument("--restart-for", type=float, default=1.0, metavar="S", help="(1.0)")
    g.add_argument(
        "--empty-first", type=int, default=0, metavar="N", help="answer the first N with nothing"
    )
    g.add_argument(
        "--truncate-first",
        type=int,
        default=0,
        metavar="N",
        help="cut the first N answers in half (finish_reason length)",
    )
    g.add_argument(
        "--garbage-first", type=int, default=0, metavar="N", help="answer the first N with prose"
    )
    g.add_argument("--fault-seed", type=int, default=0, help="seed of --fail-rate (0)")


def faults_from_args(args: argparse.Namespace) -> Faults | None:
    faults = Faults(
        fail_first=args.fail_first,
        fail_rate=args.fail_rate,
        fail_queries=frozenset(args.fail_query),
        status=args.fail_status,
        retry_after=args.retry_after,
        delay_s=args.delay,
        delay_first=args.delay_first,
        cut_first=args.cut_first,
        cut_mode=args.cut_mode,
        restart_after=args.restart_after,
        restart_for_s=args.restart_for,
        empty_first=args.empty_first,
        truncate_first=args.truncate_first,
        garbage_first=args.garbage_first,
        seed=args.fault_seed,
    )
    return faults if faults.active() else None
