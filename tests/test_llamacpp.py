"""The embedded llama.cpp server with SmolLM2-135M-Instruct: life cycle, probe, tokenizer,
constrained answers, and ``permrank rerank`` with no ``--base-url`` end to end.

SmolLM2 cannot rank: these tests assert the real path (HTTP, token counts, grammars, clean-up),
never ranking quality.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from permrank import Reranker
from permrank.backends.probe import probe
from permrank.backends.tokenizer import ServerTokenizer
from permrank.cli.main import main
from permrank.core.errors import ConfigError, EndpointUnavailable
from permrank.core.tokens import default_tokenizer
from permrank.runs.io import read_requests
from permrank.servers.llamacpp import LlamaServer, default_model_path, free_port

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
DL19_3Q20 = ROOT / "fixtures" / "dl19-3q20"
SMALL = ["--max-passage-tokens", "32"]  # short prompts: a loaded 2-core machine stays quick
SMOL = "smollm2-135m"  # the machinery is tested on the smallest model; quality is not asserted
EMBEDDED_SMOL = ["--local-model", SMOL, "--method", "listwise"]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def llama_children(pid: int) -> list[int]:
    """llama-server processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and name.startswith("llama-server") and alive(int(entry)):
            found.append(int(entry))
    return found


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    with LlamaServer(SMOL, alias="SmolLM2-135M-Instruct.Q4_1", ctx=2048) as running:
        yield running


# -- the server's life cycle ------------------------------------------------------------------
def test_server_starts_answers_and_stops(server: LlamaServer) -> None:
    assert server.running and server.base_url.startswith("http://127.0.0.1:")
    listed = httpx.get(f"{server.base_url}/models").json()["data"]
    assert [m["id"] for m in listed] == [server.model] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert server.pid in llama_children(os.getpid())


def test_a_file_that_is_not_a_model_fails_with_the_log_tail(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 100)
    broken = LlamaServer(bogus)
    before = llama_children(os.getpid())
    with pytest.raises(EndpointUnavailable, match="exited with code .* log") as caught:
        broken.start()
    assert "bogus.gguf" in str(caught.value)
    assert broken.process is None and llama_children(os.getpid()) == before
    with pytest.raises(ConfigError, match="no such model file"):
        LlamaServer(tmp_path / "missing.gguf")


def test_default_model_is_qwen_05b_assembled_from_its_wheels() -> None:
    path = default_model_path()
    assert path.name == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert path.stat().st_size == 491_400_064
    assert LlamaServer(SMOL).model_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def spawn(*argv: str, ready: str, stream: str) -> tuple[subprocess.Popen[str], int, str]:
    """``permrank ARGV`` in a child process, once a ``stream`` line contains ``ready``:
    the process, its llama-server's pid, and that line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "permrank", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seen = []  # the run may say other things first (which model, that it is local)
    for _ in range(5):
        line = getattr(process, stream).readline()
        seen.append(line)
        if ready in line or not line:
            break
    assert ready in line, "".join(seen) + process.stderr.read()  # type: ignore[union-attr]
    (child,) = llama_children(process.pid)
    return process, child, line


def serve_local(*extra: str) -> tuple[subprocess.Popen[str], int]:
    """``permrank serve local`` in a child process; it and its llama-server's pid, once ready."""
    process, child, line = spawn(
        "serve", "local", *extra, ready="base URL: http://127.0.0.1:", stream="stdout"
    )
    assert httpx.get(f"{line.split()[-1]}/models").status_code == 200
    return process, child


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_serve_local_leaves_no_server_behind(how: signal.Signals) -> None:
    process, child = serve_local("--ctx", "1024", "--local-model", SMOL)
    process.send_signal(how)
    try:
        process.wait(30)
    finally:
        if process.poll() is None:  # failed: leave nothing running behind the test either
            process.kill()
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
    process.communicate()
    # SIGINT and SIGTERM: stopped by us; SIGKILL: the kernel's parent-death signal.
    assert wait_gone(child), f"llama-server {child} outlived its parent ({how.name})"


# -- probe and tokenizer ----------------------------------------------------------------------
def test_probe_reads_llama_cpp_capabilities(server: LlamaServer) -> None:
    info = probe(server.base_url)  # no model given: the only one served
    assert info.kind == "llama.cpp" and info.model == server.model
    assert info.context_window == 2048 and info.chat and info.logprobs and info.tokenize


def test_probe_context_is_per_slot() -> None:
    with LlamaServer(SMOL, ctx=1024, parallel=2) as two_slots:
        assert probe(two_slots.base_url).context_window == 1024


def test_probe_accepts_llama_cpp_under_any_model_name(
    server: LlamaServer, caplog: pytest.LogCaptureFixture
) -> None:
    # llama.cpp's server answers as its one model whatever name a request gives: a warning.
    info = probe(server.base_url, "gpt-4o")
    assert info.kind == "llama.cpp" and info.model == "gpt-4o"
    assert "asked for 'gpt-4o'" in caplog.text and "SmolLM2" in caplog.text


def test_probe_refuses_an_unreachable_endpoint() -> None:
    port = free_port()
    with pytest.raises(
        EndpointUnavailable, match=f"cannot reach the endpoint http://127.0.0.1:{port}/v1"
    ):
        probe(f"http://127.0.0.1:{port}/v1", "any")


def test_cli_runs_a_llama_cpp_server_under_another_model_name(
    server: LlamaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ["rerank", "--input", str(DL19_3Q20 / "candidates.jsonl"), "--output"]
    out = tmp_path / "o.jsonl"
    options = ["--base-url", server.base_url, "--model", "x", "--limit", "1", "--depth", "3"]
    code = main([*args, str(out), *options])
    assert code == 0 and out.exists()
    assert "asked for 'x'" in caplog.text and "SmolLM2-135M-Instruct.Q4_1" in caplog.text


class FakeVllm(BaseHTTPRequestHandler):
    """vLLM's discovery routes only (what the probe reads)."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/models":
            body = {"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 3000}]}
        elif self.path == "/version":
            body = {"version": "0.32.0"}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_probe_reads_vllm_max_model_len() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        info = probe(f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (info.kind, info.model, info.context_window, info.version) == (
        "vllm",
        "m",
        3000,
        "0.32.0",
    )


def test_server_tokenizer_counts_with_the_models_own_vocabulary(server: LlamaServer) -> None:
    tokenizer = probe(server.base_url).tokenizer()
    assert isinstance(tokenizer, ServerTokenizer)
    text = "The life cycle of a flea: egg, larva, pupa and adult. Ctenocephalides felis!"
    ids = httpx.post(f"{server.url}/tokenize", json={"content": text}).json()["tokens"]
    assert tokenizer.count(text) == len(ids)
    assert tokenizer.count(text) != default_tokenizer().count(text)  # not cl100k_base
    cut = tokenizer.truncate(text, 5)
    assert text.startswith(cut) and 0 < tokenizer.count(cut) <= 5
    assert tokenizer.truncate(text, 1000) == text
    assert tokenizer._ids.get(text) is not None  # counted once, then remembered (bounded)
    known = len(tokenizer._ids)
    tokenizer.count(text)
    assert len(tokenizer._ids) == known


# -- constrained answers ----------------------------------------------------------------------
def five_passages() -> tuple[str, list[str]]:
    request = next(iter(read_requests(DL19_3Q20 / "candidates.jsonl")))
    return request.query.text, [c.text[:300] for c in request.candidates[:5]]


@pytest.mark.slow  # a window of SmolLM2 on a CPU: seconds, or minutes when busy
def test_grammar_gives_a_permutation_needing_no_repair(server: LlamaServer) -> None:
    query, passages = five_passages()
    with Reranker(
        server.model, server.base_url, window_size=5, step=5, constrain="grammar"
    ) as reranker:
        ranking = reranker.rank(query, passages)
    (window,) = ranking.trace
    # SmolLM2 may answer in the shown order: an echo, but no repair of the format.
    assert set(window.repair.kinds()) <= {"ok", "echo"}
    assert ranking.usage.repairs["ok"] + ranking.usage.repairs["echo"] == 1
    assert sorted(window.permutation) == [0, 1, 2, 3, 4]
    assert window.answer.count("] > [") == 4
    assert reranker.manifest()["constrain"] == "grammar"


@pytest.mark.slow  # a window of SmolLM2 on a CPU: seconds, or minutes when busy
def test_json_schema_answers_are_read_as_rankings(server: LlamaServer) -> None:
    query, passages = five_passages()
    with Reranker(
        server.model, server.base_url, window_size=5, step=5, constrain="json"
    ) as reranker:
        ranking = reranker.rank(query, passages)
    (window,) = ranking.trace
    assert json.loads(window.answer)["ranking"]  # the raw JSON answer is kept in the trace
    assert not window.repair.wrong_format and not window.repair.out_of_range
    assert sorted(ranking.docids) == [str(i) for i in range(5)]


@pytest.mark.slow  # a window of SmolLM2 on a CPU: seconds, or minutes when busy
def test_cli_constrain_auto_picks_the_grammar_and_reports_repairs(
    server: LlamaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.jsonl"
    args = ["rerank", "--input", str(DL19_3Q20 / "candidates.jsonl"), "--output", str(out)]
    args += [
        "--base-url",
        server.base_url,
        "--limit",
        "1",
        "--depth",
        "5",
        "--window-size",
        "5",
        "--step",
        "5",
    ]
    assert main([*args, "--constrain", "auto", *SMALL]) == 0
    assert "constrained (grammar): 0 of 1 window answers still needed repair" in (
        capsys.readouterr().out
    )
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["parameters"]["constrain"] == "grammar"
    # another output: onto the first one, other settings are refused before anything else
    other = [*args[:4], str(tmp_path / "regex.jsonl"), *args[5:]]
    assert main([*other, "--constrain", "regex"]) == 2
    assert "ignored by a llama.cpp server" in capsys.readouterr().err


# -- the embedded default, end to end ---------------------------------------------------------
@pytest.mark.slow  # a window of SmolLM2 on a CPU: seconds, or minutes when busy
def test_rerank_without_base_url_runs_the_embedded_model(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    argv = ["rerank", "--input", str(DL19_3Q20 / "candidates.jsonl"), "--output", str(out)]
    argv += ["--qrels", str(DL19_3Q20 / "qrels.txt"), *SMALL, *EMBEDDED_SMOL]
    before = llama_children(os.getpid())  # the module's server, if it runs
    assert main(argv) == 0
    assert llama_children(os.getpid()) == before  # the embedded one stopped when the run ended

    inputs = {
        r.query.qid: [c.docid for c in r.candidates]
        for r in read_requests(DL19_3Q20 / "candidates.jsonl")
    }
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["qid"] for o in outputs] == list(inputs)
    for o in outputs:
        docids = [c["docid"] for c in o["candidates"]]
        assert sorted(docids) == sorted(inputs[o["qid"]]) and len(set(docids)) == 20

    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    params, totals = manifest["parameters"], manifest["totals"]
    assert params["endpoint"]["kind"] == "llama.cpp"
    assert params["embedded_server"]["model_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert params["tokenizer"] == "llama.cpp:smollm2-135m"
    assert params["budget"]["context_window"] == 4096  # from the probe, not the 8192 default
    assert totals["calls"] == 3
    # Token counts are the server's: at least the 20 passages cut to 32 tokens, per call.
    assert totals["prompt_tokens"] > 3 * 20 * 20 and totals["completion_tokens"] > 0


def run_cli_in_child(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """``permrank rerank`` (embedded) in a child process; it and its server, once started."""
    argv = ["rerank", "--input", str(DL19_3Q20 / "candidates.jsonl")]
    argv += ["--output", str(tmp_path / "out.jsonl"), *EMBEDDED_SMOL, *extra]
    process, child, _ = spawn(*argv, ready="started llama.cpp", stream="stderr")
    return process, child


def test_ctrl_c_during_a_run_stops_the_embedded_server(tmp_path: Path) -> None:
    process, child = run_cli_in_child(tmp_path)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert wait_gone(child)


def test_an_error_after_start_stops_the_embedded_server(tmp_path: Path) -> None:
    process, child = run_cli_in_child(tmp_path, "--context-window", "100000")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "more than" in err and "4096" in err
    assert wait_gone(child)
