"""The ``permrank`` command end to end against the simulator, on the dl19-5q fixture."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from permrank.cli.main import build_parser, main
from permrank.runs.evaluate import evaluate, read_qrels, read_run
from permrank.runs.io import read_requests
from permrank.sim.server import Simulator

ROOT = Path(__file__).resolve().parent.parent


def rerank_args(sim: Simulator, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "rerank",
        "--input",
        str(source),
        "--output",
        str(out),
        "--base-url",
        sim.base_url,
        "--model",
        sim.state.model,
        "-q",
        *extra,
    ]


def requests_made(sim: Simulator) -> int:
    return int(sim.state.stats()["requests"])


def test_rerank_writes_output_trec_and_manifest(
    simulator: Simulator, dl19_5q: Path, tmp_path: Path
) -> None:
    out, trec = tmp_path / "out" / "reranked.jsonl", tmp_path / "runs" / "run.trec"
    before = requests_made(simulator)
    code = main(
        rerank_args(
            simulator, dl19_5q / "candidates.jsonl", out, "--trec", str(trec), "--seed", "7"
        )
    )
    assert code == 0
    assert requests_made(simulator) - before == 5 * 9

    source = list(read_requests(dl19_5q / "candidates.jsonl"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["qid"] for r in records] == [r.query.qid for r in source]
    for record, request in zip(records, source, strict=True):
        assert sorted(c["docid"] for c in record["candidates"]) == sorted(
            c.docid for c in request.candidates
        )
        assert [c["score"] for c in record["candidates"]] == [float(100 - i) for i in range(100)]
        assert set(record["candidates"][0]) >= {"docid", "text", "score"}

    run = read_run(trec)
    assert run == read_run(out)
    qrels = read_qrels(dl19_5q / "qrels.txt")
    before_ndcg = evaluate(read_run(dl19_5q / "candidates.jsonl"), qrels)["nDCG@10"]
    after_ndcg = evaluate(run, qrels)["nDCG@10"]
    assert after_ndcg > before_ndcg + 0.2  # a noiseless judge reorders by the qrels

    manifest = json.loads((tmp_path / "out" / "reranked.jsonl.manifest.json").read_text())
    params = manifest["parameters"]
    assert params["backend"]["model"] == "permrank-simulator"
    assert params["backend"]["endpoint"] == simulator.base_url
    template = params["template"]
    assert template["name"] == "rankgpt"
    assert template["sha256"] == hashlib.sha256(Path(template["source"]).read_bytes()).hexdigest()
    assert params["strategy"] == {
        "window_size": 20,
        "step": 10,
        "passes": 1,
        "top_k": None,
        "early_stop": False,
        "name": "sliding",
    }
    assert params["sampling"]["temperature"] == 0.0 and params["sampling"]["seed"] == 7
    assert params["budget"]["context_window"] == 8192
    assert params["backend"]["concurrency"] == 8 and params["backend"]["max_retries"] == 5
    versions = manifest["versions"]
    assert versions["permrank"] and versions["openai"] and versions["python"]
    totals = manifest["totals"]
    assert totals["queries"] == 5 and totals["failed_queries"] == 0
    assert totals["calls"] == 45 and totals["rounds"] == 45
    assert totals["prompt_tokens"] > 45 * 1000 and totals["completion_tokens"] > 0
    # A window already in the true order is answered unchanged: an echo, not "ok".
    assert totals["repairs"]["ok"] + totals["repairs"]["echo"] == 45
    assert manifest["files"]["trec"] == str(trec)


def test_rank_llm_input_gives_rank_llm_output(
    simulator: Simulator, dl19_5q: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reranked.jsonl.gz"
    code = main(
        rerank_args(
            simulator,
            dl19_5q / "candidates.rank_llm.jsonl",
            out,
            "--limit",
            "2",
            "--depth",
            "30",
            "--prompt",
            "rankzephyr",
            "--manifest",
            str(tmp_path / "m.json"),
        )
    )
    assert code == 0
    rankings = list(read_requests(out))
    assert [r.layout for r in rankings] == ["rank_llm", "rank_llm"]
    assert all(len(r.candidates) == 30 for r in rankings)
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["parameters"]["template"]["name"] == "rankzephyr"
    assert manifest["totals"]["calls"] == 2 * 2  # 30 candidates at 20/10: windows 10-30, 0-20
    assert manifest["files"]["limit"] == 2 and manifest["files"]["depth"] == 30


def test_rerank_prints_a_summary_and_ndcg(
    simulator: Simulator, dl19_5q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = rerank_args(
        simulator,
        dl19_5q / "candidates.jsonl",
        tmp_path / "o.jsonl",
        "--qrels",
        str(dl19_5q / "qrels.txt"),
        "--limit",
        "1",
        "--top-k",
        "20",
    )
    args.remove("-q")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 queries in" in out and "1 calls" in out
    assert "window answers: ok 1" in out
    assert "nDCG@10: " in out and " before -> " in out


def test_bad_input_is_refused_before_any_request(
    simulator: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"qid": "1", "query": "q", "candidates": [{"docid": "a"}]}\n')
    before = requests_made(simulator)
    assert main(rerank_args(simulator, source, tmp_path / "o.jsonl")) == 2
    assert requests_made(simulator) == before
    err = capsys.readouterr().err
    assert f"permrank rerank: error: {source}:1: candidates[0].text is missing" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--step", "0"], "step must be at least 1"),
        (["--window-size", "10", "--step", "20"], "larger than window_size"),
        (["--prompt", "nosuch"], "no template 'nosuch'"),
        (["--concurrency", "0"], "concurrency must be at least 1"),
    ],
)
def test_impossible_settings_exit_2(
    simulator: Simulator,
    dl19_5q: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    before = requests_made(simulator)
    code = main(rerank_args(simulator, dl19_5q / "candidates.jsonl", tmp_path / "o.jsonl", *extra))
    assert code == 2
    assert message in capsys.readouterr().err
    assert requests_made(simulator) == before


def test_model_defaults_to_the_one_the_endpoint_serves(
    simulator, dl19_5q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without --base-url permrank starts its embedded model (tests/test_llamacpp.py); with one
    # and no --model, the probe takes the only model the endpoint serves.
    out = tmp_path / "o.jsonl"
    code = main(
        [
            "rerank",
            "--input",
            str(dl19_5q / "candidates.jsonl"),
            "--output",
            str(out),
            "--base-url",
            simulator.base_url,
            "--limit",
            "1",
            "--no-cache",
            "-q",
        ]
    )
    assert code == 0
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["parameters"]["backend"]["model"] == "permrank-simulator"


def test_missing_local_model_is_refused(
    dl19_5q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No --base-url: the embedded model; a --local-model that does not exist is refused.
    code = main(
        ["rerank", "--input", str(dl19_5q / "candidates.jsonl"), "--output", str(tmp_path / "o")]
        + ["--local-model", str(tmp_path / "missing.gguf")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.gguf: no such model file" in err


def test_eval_prints_ndcg_for_trec_and_jsonl(
    dl19_5q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qrels = dl19_5q / "qrels.txt"
    trec = tmp_path / "bm25.trec"
    runs = read_run(dl19_5q / "candidates.jsonl")
    trec.write_text(
        "".join(
            f"{qid} Q0 {docid} {rank} {score} bm25\n"
            for qid, docs in runs.items()
            for rank, (docid, score) in enumerate(docs.items(), 1)
        )
    )
    code = main(
        [
            "eval",
            "--run",
            str(trec),
            "--run",
            str(dl19_5q / "candidates.rank_llm.jsonl"),
            "--qrels",
            str(qrels),
            "--metrics",
            "nDCG@10",
            "P(rel=2)@10",
            "--per-query",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "nDCG@10", "P(rel=2)@10"]
    expected = evaluate(runs, read_qrels(qrels), ["nDCG@10"])["nDCG@10"]
    summary = [line for line in lines if line.startswith(str(tmp_path)) or "rank_llm" in line]
    assert len(summary) == 2
    for line in summary:
        assert line.split()[1] == f"{expected:.4f}"
    assert sum("\tnDCG@10\t" in line for line in lines) == 2 * 5  # per query, both runs


def test_eval_refuses_an_unknown_metric(dl19_5q: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "eval",
            "--run",
            str(dl19_5q / "candidates.jsonl"),
            "--qrels",
            str(dl19_5q / "qrels.txt"),
            "--metrics",
            "nDCG@ten",
        ]
    )
    assert code == 2
    assert "unknown metric 'nDCG@ten'" in capsys.readouterr().err


def subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


@pytest.mark.parametrize("command", [[], *([c] for c in subcommands())])
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: permrank")
    assert "--help" in out


def test_every_issue_command_is_there() -> None:
    assert {"rerank", "eval", "simulate"} <= set(subcommands())


def test_simulate_command_serves_a_rerank(dl19_5q: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, "-m", "permrank", "simulate", "--data", str(dl19_5q), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert banner.startswith("permrank simulator: http://127.0.0.1:")
        base_url = banner.split()[2]
        out = tmp_path / "o.jsonl"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "permrank",
                "rerank",
                "--input",
                str(dl19_5q / "candidates.jsonl"),
                "--output",
                str(out),
                "--base-url",
                base_url,
                "--model",
                "permrank-simulator",
                "--limit",
                "1",
                "--qrels",
                str(dl19_5q / "qrels.txt"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "9 calls" in result.stdout and "nDCG@10:" in result.stdout
        assert len(out.read_text().splitlines()) == 1
    finally:
        server.terminate()
        server.wait(timeout=10)


class FailQuery:
    """Simulator fault: every window of one query gets a 503."""

    def __init__(self, query_text: str):
        self.query_text = query_text

    def intercept(self, handler, body, path) -> bool:
        if not any(self.query_text in str(m.get("content")) for m in body.get("messages", [])):
            return False
        handler._send(503, {"error": {"message": "injected overload"}})
        return True


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_a_failing_query(
    simulator: Simulator,
    dl19_5q: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    on_error: str,
) -> None:
    requests = list(read_requests(dl19_5q / "candidates.jsonl"))
    broken = requests[2]
    out = tmp_path / "o.jsonl"
    simulator.state.faults = FailQuery(broken.query.text)
    try:
        code = main(
            rerank_args(
                simulator,
                dl19_5q / "candidates.jsonl",
                out,
                "--on-error",
                on_error,
                "--max-retries",
                "1",
                "--limit",
                "4",
            )
        )
    finally:
        simulator.state.faults = None
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    records = [json.loads(line) for line in out.read_text().splitlines()]
    err = capsys.readouterr().err
    if on_error == "skip":
        assert code == 1
        assert [r["qid"] for r in records] == [r.query.qid for r in requests[:4]]
        failed = records[2]
        assert "HTTP 503" in failed["error"] and "after 2 attempt(s)" in failed["error"]
        assert [c["docid"] for c in failed["candidates"]] == [c.docid for c in broken.candidates]
        assert all("error" not in r for i, r in enumerate(records) if i != 2)
        assert manifest["totals"]["queries"] == 4
        assert manifest["totals"]["failed_queries"] == 1
        assert list(manifest["failed"]) == [broken.query.qid]
    else:
        assert code == 2
        assert "HTTP 503" in err and "/chat/completions" in err
        # What was finished before the failure is written and accounted for.
        assert [r["qid"] for r in records] == [r.query.qid for r in requests[:2]]
        assert manifest["totals"]["queries"] == 2


def test_output_over_the_input_is_refused(
    simulator: Simulator, dl19_5q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes((dl19_5q / "candidates.jsonl").read_bytes())
    assert main(rerank_args(simulator, source, source)) == 2
    assert "is the input file" in capsys.readouterr().err
    assert source.read_bytes() == (dl19_5q / "candidates.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["rerank", "--input", "x", "--output", "y", "--windw-size", "5"],
            "did you mean --window-size?",
        ),
        (["rerank", "--inptu", "x", "--output", "y"], "--inptu: did you mean --input?"),
        (["distill", "--input", "x", "--out", "y", "--augmnt", "1"], "did you mean --augment?"),
        (["rernk", "--input", "x"], "rernk: did you mean rerank?"),
    ],
)
def test_a_mistyped_flag_gets_the_commands_usage_and_a_suggestion(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    if argv[0] != "rernk":  # the subcommand's own usage, not the top-level one
        assert f"usage: permrank {argv[0]} " in err and "--window-size" in err


def test_without_base_url_the_first_line_says_the_model_is_local(
    dl19_5q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from permrank.servers import llamacpp

    def no_server(self):  # the notice must come before the (slow) start
        raise llamacpp.ConfigError("not started in this test")

    monkeypatch.setattr(llamacpp.LlamaServer, "start", no_server)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    code = main(
        ["rerank", "--input", str(dl19_5q / "candidates.jsonl"), "--output", str(tmp_path / "o")]
        + ["--local-model", str(gguf), "-q"]
    )
    assert code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("no --base-url: using the local model tiny.gguf on this machine")
    assert "--base-url URL --model NAME" in first
