"""llama.cpp's AMX kernels where they work, ``--no-repack`` where they crash.

The crash is a process dying of SIGILL on its first long prompt; a stand-in ``llama-server``
(a small Python HTTP server that kills itself with SIGILL unless given ``--no-repack``) gives
both builds on any CPU. The Q8_0 copy is made by the real ``llama-quantize``."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from permrank.servers import amx, llamacpp
from permrank.servers.llamacpp import LlamaServer, smollm2_path
from permrank.servers.models import LocalModel, Part

FAKE_SERVER = """#!{python}
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
crash = {crash} and "--no-repack" not in argv
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if crash:
            os.kill(os.getpid(), signal.SIGILL)
        body = json.dumps({{"content": "x"}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def amx_cpu(monkeypatch, tmp_path):
    """An AMX CPU, a cache folder of the test's own, and a stand-in llama-server."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(amx.ENV, raising=False)
    monkeypatch.setattr(amx, "amx_flags", lambda: True)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "argv.jsonl"))

    def install(crash: bool) -> Path:
        folder = tmp_path / ("crashing" if crash else "working")
        folder.mkdir()
        binary = folder / "llama-server"
        binary.write_text(FAKE_SERVER.format(python=sys.executable, crash=crash))
        binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setattr(llamacpp, "llama_server_binary", lambda: binary)
        return binary

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    return install, model, tmp_path / "argv.jsonl"


def launches(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_build_whose_amx_kernels_crash_runs_without_them(amx_cpu, caplog):
    install, model, log = amx_cpu
    binary = install(crash=True)
    with LlamaServer(model) as server:
        assert server.amx is False and server.running
        assert server.describe()["amx"] is False
    first = launches(log)
    # The check ran with repacking on and crashed; the server then ran with --no-repack.
    assert ["--no-repack" in argv for argv in first] == [False, True]
    assert "crash in this build (SIGILL)" in caplog.text
    assert amx.verdict(binary) is False
    # Known now: the next start goes straight to --no-repack, with no check and no warning.
    caplog.clear()
    with LlamaServer(model) as server:
        assert server.amx is False
    assert ["--no-repack" in argv for argv in launches(log)[len(first) :]] == [True]
    assert "SIGILL" not in caplog.text


def test_a_build_whose_amx_kernels_work_uses_them(amx_cpu):
    install, model, log = amx_cpu
    binary = install(crash=False)
    with LlamaServer(model) as server:
        assert server.amx is True and server.model_path == model
    assert ["--no-repack" in argv for argv in launches(log)] == [False, False]
    assert amx.verdict(binary) is True


def test_a_rebuilt_llama_cpp_is_checked_again(amx_cpu):
    install, model, log = amx_cpu
    binary = install(crash=True)
    with LlamaServer(model):
        pass
    assert amx.verdict(binary) is False
    later = time.time() + 5
    os.utime(binary, (later, later))  # reinstalled: another build
    assert amx.verdict(binary) is None


@pytest.mark.parametrize(
    ("extra", "env", "no_repack"),
    [
        (("--no-repack",), None, True),
        ((), "0", True),
        ((), "1", False),
        (("--repack", "1"), None, False),
    ],
)
def test_the_users_choice_is_not_checked_nor_overridden(
    amx_cpu, monkeypatch, extra, env, no_repack
):
    install, model, log = amx_cpu
    install(crash=False)
    if env is not None:
        monkeypatch.setenv(amx.ENV, env)
    with LlamaServer(model, extra_args=extra) as server:
        assert server.amx is None
    (argv,) = launches(log)
    assert ("--no-repack" in argv) is no_repack
    assert argv.count("--no-repack") <= 1


@pytest.mark.server
def test_the_q8_0_copy_is_derived_once_and_again_when_its_source_changes(tmp_path, monkeypatch):
    """Real llama-quantize on a real GGUF (SmolLM2's, as a stand-in for a shipped Q4_K_M)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "source.gguf"
    source.write_bytes(smollm2_path().read_bytes())
    model = LocalModel(
        name="stand-in",
        title="",
        file_name="stand-in.gguf",
        size=source.stat().st_size,
        sha256="0" * 64,
        parts=(Part("p", "1", "p", "f", 1, ""),),
    )
    binary = llamacpp.llama_server_binary()
    copy = amx.requantized(model, source, binary)
    assert copy.name == "stand-in.q8_0.gguf" and copy.read_bytes()[:4] == b"GGUF"
    made = copy.stat().st_mtime_ns
    assert amx.requantized(model, source, binary) == copy
    assert copy.stat().st_mtime_ns == made  # reused, not derived again
    assert not list(copy.parent.glob(".permrank-assembling-*"))
    later = time.time() + 5
    os.utime(source, (later, later))  # the source was assembled again
    amx.requantized(model, source, binary)
    assert copy.stat().st_mtime_ns != made


@pytest.mark.parametrize(("works", "status", "says"), [(False, 1, "crash"), (True, 0, "work")])
def test_models_amx_reports_the_builds_verdict(amx_cpu, capsys, works, status, says):
    """``permrank models amx`` (what scripts/setup runs to decide on a rebuild)."""
    from permrank.cli.main import main

    install, _, _ = amx_cpu
    amx.record(install(crash=not works), works)
    assert main(["models", "amx"]) == status
    assert f"llama.cpp's AMX kernels: {says}" in capsys.readouterr().out
