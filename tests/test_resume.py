"""A run killed at any moment (SIGKILL included) and started again finishes as if never killed."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from reliability_support import (
    CANDIDATES,
    ROOT,
    docids_by_qid,
    read_jsonl,
    rerank_argv,
    run_cli,
    simulator,
)

QIDS = [r["qid"] for r in read_jsonl(CANDIDATES)]


def trec_docids(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, docid, rank, _, _ = line.split()
        out.setdefault(qid, []).append(docid)
        assert len(out[qid]) == int(rank)
    return out


def cached_answers(path: Path) -> int:
    """Answers committed to the response cache (0 if the run died before it made one)."""
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path)) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
        except sqlite3.OperationalError:  # killed between creating the file and its table
            return 0


def assert_whole_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    qids = [json.loads(line)["qid"] for line in data.splitlines()]
    assert len(qids) == len(set(qids)), "a qid was written twice"
    return qids


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_requests", [3, 17, 31])
def test_sigkilled_cli_resumes_to_the_uninterrupted_result(tmp_path, capsys, kill_after_requests):
    with simulator() as sim:
        # The uninterrupted run, in this process, with a cache of its own.
        reference = tmp_path / "reference.jsonl"
        argv = rerank_argv(sim, CANDIDATES, reference, tmp_path / "ref.sqlite")
        assert run_cli(argv, capsys)[0] == 0
        total = sim.state.requests
        assert total == 45
        sim.state.latency_s = 0.06  # slow enough to be killed mid-run

        output, trec = tmp_path / "run.jsonl", tmp_path / "run.trec"
        command = [sys.executable, "-m", "permrank"] + rerank_argv(
            sim, CANDIDATES, output, tmp_path / "cache.sqlite", "--trec", str(trec)
        )
        command += ["--concurrency", "2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while sim.state.requests < total + kill_after_requests:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        asked_before_kill = sim.state.requests - total
        per_query_before = dict(sim.state.per_query)
        committed = cached_answers(tmp_path / "cache.sqlite")
        written_before = [
            json.loads(line)["qid"]
            for line in output.read_bytes().splitlines(keepends=True)
            if line.endswith(b"\n")
        ]
        assert len(written_before) < len(QIDS), "the kill came too late to test anything"

        # The same command again.
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        asked_after = sim.state.requests - total - asked_before_kill

    assert sorted(assert_whole_lines(output)) == sorted(QIDS)
    assert docids_by_qid(output) == docids_by_qid(reference)  # query by query
    assert read_jsonl(output) == [r for r in read_jsonl(output)]
    assert trec_docids(trec) == docids_by_qid(output)
    # Queries written before the kill were not asked again; answered windows came from the cache.
    for qid in written_before:
        assert sim.state.per_query[qid] == per_query_before[qid]
    # Every answer committed before the kill was reused; every other window was asked once more.
    assert asked_after == total - committed
    # SIGKILL loses only what was in flight: sent on one of the 2 connections, or answered but not
    # yet committed (the next request goes out as soon as a connection is free).
    assert asked_before_kill - committed <= 2 * 2
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    assert manifest["resumed_queries"] == len(written_before)
    assert manifest["complete"] is True


def test_partial_last_line_is_repaired_and_the_query_asked_again(tmp_path, capsys, caplog):
    with simulator() as sim:
        reference = tmp_path / "reference.jsonl"
        argv = rerank_argv(sim, CANDIDATES, reference, tmp_path / "c.sqlite", "--limit", "3")
        assert run_cli(argv, capsys)[0] == 0
        lines = reference.read_bytes().splitlines(keepends=True)
        output = tmp_path / "out.jsonl"
        output.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # killed mid-write
        copy_record(reference, output)
        asked = sim.state.requests
        argv = rerank_argv(
            sim,
            CANDIDATES,
            output,
            tmp_path / "c.sqlite",
            "--limit",
            "3",
            "--trec",
            str(tmp_path / "out.trec"),
        )
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
        assert sim.state.requests == asked  # everything came from the cache
    assert output.read_bytes() == reference.read_bytes()
    assert trec_docids(tmp_path / "out.trec") == docids_by_qid(output)
    assert "removed 1 incomplete or failed line" in caplog.text


def test_damaged_gzip_output_is_repaired(tmp_path, capsys):
    with simulator() as sim:
        reference = tmp_path / "reference.jsonl.gz"
        argv = rerank_argv(sim, CANDIDATES, reference, tmp_path / "c.sqlite", "--limit", "3")
        assert run_cli(argv, capsys)[0] == 0
        data = reference.read_bytes()
        output = tmp_path / "out.jsonl.gz"
        output.write_bytes(data[: len(data) - 40])  # the last member cut short
        copy_record(reference, output)
        argv = rerank_argv(sim, CANDIDATES, output, tmp_path / "c.sqlite", "--limit", "3")
        assert run_cli(argv, capsys)[0] == 0
    with gzip.open(output, "rt") as a, gzip.open(reference, "rt") as b:
        assert a.read() == b.read()


def copy_record(made: Path, to: Path) -> None:
    """Give ``to`` the run record of ``made`` (the same settings made it)."""
    Path(f"{to}.run.json").write_bytes(Path(f"{made}.run.json").read_bytes())


def test_failed_queries_are_asked_again_and_overwrite_starts_afresh(tmp_path, capsys):
    records = read_jsonl(CANDIDATES)[:2]
    output = tmp_path / "out.jsonl"
    stale = {"qid": records[0]["qid"], "query": records[0]["query"], "candidates": []}
    failed = {**records[1], "error": "HTTP 503 after 6 attempts"}
    with simulator() as sim:
        argv = rerank_argv(sim, CANDIDATES, output, tmp_path / "c.sqlite", "--limit", "2")
        # A run with these settings (another cache) left one query done and one failed.
        first = rerank_argv(sim, CANDIDATES, output, None, "--no-cache", "--limit", "2")
        assert run_cli(first, capsys)[0] == 0
        output.write_text(json.dumps(stale) + "\n" + json.dumps(failed) + "\n")
        sim.state.per_query.clear()
        assert run_cli(argv, capsys)[0] == 0
        assert sim.state.per_query[records[0]["qid"]] == 0  # written already: kept
        assert sim.state.per_query[records[1]["qid"]] == 9  # failed before: asked again
        out = read_jsonl(output)
        assert [r["qid"] for r in out] == [records[0]["qid"], records[1]["qid"]]
        assert out[0]["candidates"] == [] and "error" not in out[1]
        assert len(out[1]["candidates"]) == 100
        assert run_cli(argv + ["--overwrite"], capsys)[0] == 0
        out = read_jsonl(output)
        assert [len(r["candidates"]) for r in out] == [100, 100]


@pytest.mark.slow
def test_ctrl_c_ends_cleanly_counts_what_was_spent_and_resumes(tmp_path, capsys):
    """SIGINT a real ``permrank rerank`` mid-run: one line, exit 130, no asyncio noise; the
    manifest counts the calls really answered; the same command resumes and finishes."""
    output = tmp_path / "run.jsonl"
    with simulator(latency_s=0.03) as sim:
        command = [sys.executable, "-m", "permrank"] + rerank_argv(
            sim, CANDIDATES, output, tmp_path / "c.sqlite", "--concurrency", "2"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while sim.state.requests < 12:
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        answered = sim.state.requests
        assert proc.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("permrank rerank: interrupted"), err
        assert "run the same command again to resume" in lines[0]
        for noise in ("Traceback", "Event loop is closed", "Task was destroyed", "SIGTERM"):
            assert noise not in err
        manifest = json.loads(Path(f"{output}.manifest.json").read_text())
        assert manifest["stopped_by"] == "interrupted" and manifest["complete"] is False
        spent = manifest["totals"]
        # Every answer that arrived is counted, finished queries or not (at most the requests
        # in flight when it stopped are not).
        assert answered - 2 <= spent["calls"] <= answered
        # ... and every answer counted was kept: the interrupted run committed them all.
        assert cached_answers(tmp_path / "c.sqlite") == spent["calls"]
        assert spent["prompt_tokens"] > 0 and spent["completion_tokens"] > 0
        written = len(read_jsonl(output))

        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
    assert sorted(assert_whole_lines(output)) == sorted(QIDS)
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    assert manifest["complete"] is True and manifest["resumed_queries"] == written
    # The totals include the interrupted session's calls.
    assert manifest["totals"]["calls"] == spent["calls"] + manifest["this_run"]["totals"]["calls"]
