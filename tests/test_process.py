"""The life cycle every managed server shares (permrank.servers.process.ManagedServer), on a toy
HTTP server: ready on /health, stopped with its whole process group, a failed start quoting the
log, a taken port retried, and `permrank serve`'s wait for a server that dies on its own."""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from permrank.core.errors import EndpointUnavailable
from permrank.servers import process
from permrank.servers.process import ManagedServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")

# argv: host port mode. Modes: ok; stubborn (it and a grandchild ignore SIGTERM); fail (exits
# while starting); brief (serves for a second, then exits with code 5).
TOY = """
import http.server, os, signal, subprocess, sys, threading
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "fail":
    print("the model file is broken", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"grandchild {child.pid}", flush=True)
if mode == "brief":
    threading.Timer(1.0, os._exit, (5,)).start()
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, port), Health).serve_forever()
"""


class ToyServer(ManagedServer):
    name = "toy-server"
    log_prefix = "permrank-test-toy-"
    poll_s = 0.05
    terminate_grace_s = 1.0

    def __init__(self, mode: str = "ok", *, port: int | None = None):
        super().__init__(host="127.0.0.1", port=port, log_path=None, ready_timeout_s=30.0)
        self.mode = mode
        self.model = "toy"

    @property
    def model_source(self) -> str:
        return f"toy-{self.mode}"

    def command(self) -> list[str]:
        return [sys.executable, "-c", TOY, self.host, str(self.port), self.mode]

    def port_taken(self, log_text: str, exited: bool) -> bool:
        return exited and "address already in use" in log_text

    def describe(self) -> dict[str, Any]:
        return {"server": "toy", "mode": self.mode}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_ready_on_health_and_stopped_without_a_trace() -> None:
    with ToyServer() as server:
        assert server.running and server.ready_s is not None
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        pid, log_path = server.pid, server.log_path
        assert pid is not None and log_path is not None and log_path.exists()
    assert not server.running and server.pid is None
    assert gone(pid) and not log_path.exists()


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(caplog) -> None:
    server = ToyServer("stubborn").start()
    assert server.log_path is not None and server.pid is not None
    leader = server.pid
    (line,) = [x for x in server.log_path.read_text().splitlines() if x.startswith("grandchild")]
    grandchild = int(line.split()[1])
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started >= server.terminate_grace_s * 0.9
    assert gone(leader) and gone(grandchild), "a process of the group outlived stop()"
    # Our own child, stopped on purpose (after a Ctrl-C, say): no warning for the user.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_server_that_dies_while_starting_is_reported_with_its_log() -> None:
    server = ToyServer("fail")
    with pytest.raises(EndpointUnavailable, match="toy-server exited with code 3") as caught:
        server.start()
    assert "(model toy-fail)" in str(caught.value)
    assert "the model file is broken" in str(caught.value)  # the log's tail
    assert server.process is None
    assert server.log_path is not None and server.log_path.exists()  # kept for the user
    server.log_path.unlink()


def test_a_picked_port_taken_meanwhile_is_retried(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([taken_port])
    real_free_port = process.free_port
    monkeypatch.setattr(
        process, "free_port", lambda host: next(picks, None) or real_free_port(host)
    )
    with ToyServer() as server:
        assert server.port != taken_port
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_requested_port_that_is_taken_is_an_error(taken_port: int) -> None:
    server = ToyServer(port=taken_port)
    with pytest.raises(EndpointUnavailable, match="(?i)address already in use"):
        server.start()
    assert server.process is None and server.port == taken_port
    assert server.log_path is not None
    server.log_path.unlink()


def test_serve_reports_a_server_that_exits_on_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    server = ToyServer("brief")
    with pytest.raises(EndpointUnavailable, match="toy-server exited on its own with code 5"):
        server.serve_until_exit(context_window=512)
    out = capsys.readouterr().out
    assert f"base URL: http://127.0.0.1:{server.port}/v1" in out
    assert "--model toy --context-window 512" in out
    assert server.log_path is not None and server.log_path.exists()  # kept for the user
    server.log_path.unlink()
