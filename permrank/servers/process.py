"""A model server as a child process that never outlives permrank: ``ManagedServer`` and helpers.

``ManagedServer`` starts a server's command on a free loopback port (another one if that port is
taken meanwhile), waits until ``/health`` answers, and stops it again with its whole process
group. It is stopped by ``stop()``, by the context manager, at interpreter exit, on SIGTERM/SIGHUP
(turned into ``SystemExit`` where no other handler is set), on Ctrl-C (``KeyboardInterrupt``
unwinds through the context manager), and on Linux the kernel signals it when its parent dies
(``PR_SET_PDEATHSIG``). Subclasses say what to run: ``LlamaServer``, ``VllmServer``.

Why ~410 lines: the whole life of a server process (start with port retry, health wait,
parent-death signal, group stop with a grace period, the at-exit registry, the serve loop) is
one state machine shared by llama.cpp and vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, Self

from permrank.core.errors import EndpointUnavailable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent (thread) dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# -- everything live, stopped at exit and on termination signals ----------------------------------
class Stoppable(Protocol):
    def stop(self) -> None: ...


_live: set[Stoppable] = set()
_live_lock = threading.Lock()
_hooks_installed = False


def stop_at_exit(thing: Stoppable) -> None:
    """Stop ``thing`` at interpreter exit and on SIGTERM/SIGHUP (until ``forget_at_exit``)."""
    _install_hooks()
    with _live_lock:
        _live.add(thing)


def forget_at_exit(thing: Stoppable) -> None:
    with _live_lock:
        _live.discard(thing)


def _stop_all() -> None:
    with _live_lock:
        things = list(_live)
    for thing in things:
        thing.stop()


def _exit_on_signal(signum: int, frame: object) -> None:
    _stop_all()
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    """atexit, and SIGTERM/SIGHUP -> SystemExit where nothing else handles them."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _exit_on_signal)


# -- processes started by a library, which we cannot give PDEATHSIG ourselves ---------------------
def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux; empty elsewhere)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(p) for p in children.read_text().split()]
                found.extend(kids)
                stack.extend(kids)
    return found


REAPER = """
import os, signal, sys
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def reap(*_):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, reap)
if os.getppid() != parent:
    reap()
while True:
    signal.pause()
"""


def start_reaper(pids: Sequence[int]) -> subprocess.Popen[bytes] | None:
    """A watcher that SIGKILLs ``pids`` when this thread or process dies, or when it is stopped.

    For processes started by a library (vLLM's engine) that we cannot give PDEATHSIG ourselves.
    """
    if not pids or not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen(
        [sys.executable, "-c", REAPER, str(os.getpid()), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def stop_reaper(reaper: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the reaper: it kills whatever of its processes is still alive, then exits."""
    if reaper is None:
        return
    with contextlib.suppress(ProcessLookupError):
        reaper.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(5)


def log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- a server process --------------------------------------------------------------------------
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def healthy(url: str, timeout_s: float) -> bool:
    """Whether a server we started answers its health route with 200 yet (a loopback GET from
    the starting thread: no event loop involved, so the standard library's client is enough)."""
    try:
        with NO_PROXY.open(url, timeout=timeout_s) as answer:
            return bool(answer.status == 200)
    except (OSError, http.client.HTTPException):  # refused, reset, 503 (HTTPError), timeout
        return False


class ManagedServer:
    """An HTTP server child process on loopback; ``with Server(...) as s: s.base_url``.

    Subclasses set ``name`` (in messages), ``log_prefix`` (of the temporary log file), the poll
    interval and timeouts, and give ``command()``, ``model_source`` (the model file or folder,
    for errors), ``port_taken()``, ``describe()`` and, if they need one, ``environment()``.
    ``port=None`` picks a free port. The server's output goes to ``log_path`` (a temporary file
    by default: removed on a clean stop, kept and quoted in the error when the server fails to
    start).
    """

    name = "server"
    log_prefix = "permrank-server-"
    poll_s = 0.1
    """Seconds between two ``/health`` polls while starting."""
    health_timeout_s = 2.0
    terminate_grace_s = 5.0
    """Seconds from SIGTERM to SIGKILL on stopping."""
    log_tail_lines = 20
    """Lines of the server's log quoted in errors."""

    model: str

    def __init__(
        self,
        *,
        host: str,
        port: int | None,
        log_path: str | os.PathLike[str] | None,
        ready_timeout_s: float,
    ):
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self.ready_timeout_s = ready_timeout_s
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        """Seconds from start to ready, once started."""

    # -- what subclasses give ----------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def model_source(self) -> str:
        """The model file or folder, as errors name it."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment; ``None`` inherits ours."""
        return None

    def port_taken(self, log_text: str, exited: bool) -> bool:
        """Whether a failed start was because the port was taken (``log_text`` in lower case)."""
        return False

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- addresses ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:43121`` (``/health``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. ``http://127.0.0.1:43121/v1``."""
        return f"{self.url}/v1"

    def _log_tail(self) -> str:
        return log_tail(self.log_path, self.log_tail_lines)

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the server and wait until it answers ``/health``; a no-op if it is running."""
        if self.running:
            return self
        attempts = 1 if self.requested_port else 3  # a picked port can be taken meanwhile
        for attempt in range(attempts):
            self.port = self.requested_port or free_port(self.host)
            started = time.monotonic()
            self._spawn()
            try:
                self._wait_ready()
                self.ready_s = time.monotonic() - started
                return self
            except EndpointUnavailable:
                exited = self.process is not None and self.process.poll() is not None
                tail = self._log_tail().lower()
                self._terminate()
                if self.port_taken(tail, exited) and attempt + 1 < attempts:
                    log.info("port %s was taken; trying another", self.port)
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix=self.log_prefix, suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        assert self.log_path is not None
        command = self.command()
        log.info("starting %s (log: %s)", " ".join(command), self.log_path)
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                # Its own process group: whatever it spawns is in it too, so the whole group is
                # stopped together; a terminal's Ctrl-C reaches only us, and we stop it in order.
                start_new_session=True,
                # PDEATHSIG fires when the creating *thread* ends, so only from the main thread.
                preexec_fn=_die_with_parent
                if sys.platform.startswith("linux") and in_main_thread
                else None,
            )
        stop_at_exit(self)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise EndpointUnavailable(
                    f"{self.name} exited with code {code} while starting "
                    f"(model {self.model_source}). Its log ({self.log_path}) ends:\n"
                    f"{self._log_tail()}"
                )
            if healthy(f"{self.url}/health", self.health_timeout_s):
                log.info("%s ready at %s (model %s)", self.name, self.base_url, self.model)
                return
            if time.monotonic() > deadline:
                raise EndpointUnavailable(
                    f"{self.name} did not become ready within {self.ready_timeout_s:.0f} s "
                    f"at {self.url}. Its log ({self.log_path}) ends:\n{self._log_tail()}"
                )
            time.sleep(self.poll_s)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _terminate(self) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after ``terminate_grace_s``."""
        process, self.process = self.process, None
        forget_at_exit(self)
        if process is None:
            return None
        pgid = process.pid  # start_new_session: the leader's pid is the group's id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.terminate_grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(self.terminate_grace_s)
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            # Our own child, stopped on purpose (often mid-request, after a Ctrl-C): killing it
            # is the plan, not news for the user.
            log.info(
                "%s (process group %s) still running %.0f s after SIGTERM; killing it",
                self.name,
                pgid,
                self.terminate_grace_s,
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        process.wait()
        return process.returncode

    def stop(self) -> None:
        """Stop the server with every process it started; remove its log if we made it."""
        code = self._terminate()
        if code is None:
            return
        log.info("%s on port %s stopped (exit code %s)", self.name, self.port, code)
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- permrank serve KIND -----------------------------------------------------------------
    def serve_until_exit(self, context_window: int) -> NoReturn:
        """Start, print how to use the server, and wait: for Ctrl-C or SIGTERM (which unwind
        through here and stop it), or for it to die, which raises ``EndpointUnavailable``."""
        with self:
            print(f"base URL: {self.base_url}", flush=True)
            print(f"model:    {self.model}", flush=True)
            print(f"log:      {self.log_path}", flush=True)
            print(
                f"try: permrank rerank --base-url {self.base_url} --model {self.model} "
                f"--context-window {context_window} --input FILE --output OUT   "
                "(Ctrl-C stops the server)",
                flush=True,
            )
            assert self.process is not None
            while self.process.poll() is None:
                time.sleep(0.5)
            self._own_log = False  # it died on its own: keep its log for the user
            code = self.process.returncode
        raise EndpointUnavailable(
            f"{self.name} exited on its own with code {code}; its log ({self.log_path}) ends:\n"
            f"{self._log_tail()}"
        )
