"""Faults a real endpoint has, injected by the simulator: each one is survived or reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from reliability_support import (
    CANDIDATES,
    docids_by_qid,
    read_jsonl,
    rerank_argv,
    run_cli,
    simulator,
)

from permrank.servers.process import free_port
from permrank.sim.faults import Faults

QIDS = [r["qid"] for r in read_jsonl(CANDIDATES)]
LIMIT = ["--limit", "2"]  # 2 queries x 9 windows: 18 requests when nothing fails


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory,
) -> dict[str, list[str]]:
    """The result of a fault-free run."""
    folder = tmp_path_factory.mktemp("reference")
    with simulator() as sim:
        from permrank.cli.main import main

        argv = rerank_argv(sim, CANDIDATES, folder / "out.jsonl", None, "--no-cache", *LIMIT)
        assert main(argv) == 0
    return docids_by_qid(folder / "out.jsonl")


def run_with(
    faults: Faults, tmp_path: Path, capsys, *extra: str, port: int = 0
) -> tuple[int, str, dict, int]:
    """Rerank 2 queries against a faulty simulator: exit code, stderr, manifest, requests."""
    with simulator(faults=faults, port=port) as sim:
        argv = rerank_argv(sim, CANDIDATES, tmp_path / "out.jsonl", tmp_path / "c.sqlite", *LIMIT)
        code, _, err = run_cli(argv + list(extra), capsys)
        seen = faults.describe()["requests_seen"]
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    return code, err, manifest, seen


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried_to_the_fault_free_result(tmp_path, capsys, reference, status):
    faults = Faults(fail_first=3, status=status)
    code, err, manifest, seen = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert faults.injected == {"fail": 3}
    assert seen == 18 + 3
    assert docids_by_qid(tmp_path / "out.jsonl") == reference
    assert manifest["totals"]["calls"] == 18 and manifest["complete"] is True


def test_429_with_retry_after_waits_as_asked(tmp_path, capsys, reference):
    faults = Faults(fail_first=2, status=429, retry_after=0.4)
    started = time.perf_counter()
    code, err, _, _ = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    # The two queries' first windows go out together: their two waits may overlap.
    assert time.perf_counter() - started >= 0.4
    assert docids_by_qid(tmp_path / "out.jsonl") == reference


def test_429_without_retry_after_backs_off_and_finishes(tmp_path, capsys, reference):
    faults = Faults(fail_first=2, status=429)
    code, err, _, _ = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert faults.injected == {"fail": 2}
    assert docids_by_qid(tmp_path / "out.jsonl") == reference


def test_read_timeout_is_retried(tmp_path, capsys, reference):
    faults = Faults(delay_s=2.0, delay_first=1)
    code, err, _, seen = run_with(faults, tmp_path, capsys, "--timeout", "0.5")
    assert code == 0, err
    assert faults.injected == {"delay": 1}
    assert seen == 18 + 1  # the timed-out request was asked again
    assert docids_by_qid(tmp_path / "out.jsonl") == reference


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_cut_connections_are_retried(tmp_path, capsys, reference, mode):
    faults = Faults(cut_first=2, cut_mode=mode)
    code, err, _, seen = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert faults.injected == {"cut": 2}
    assert docids_by_qid(tmp_path / "out.jsonl") == reference


def test_server_restarting_mid_run_refuses_connections_then_comes_back(tmp_path, capsys, reference):
    faults = Faults(restart_after=5, restart_for_s=1.0)
    code, err, manifest, _ = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert faults.injected["restart"] == 1
    assert docids_by_qid(tmp_path / "out.jsonl") == reference
    assert manifest["totals"]["calls"] == 18


def test_fraction_of_failures_is_survived(tmp_path, capsys, reference):
    faults = Faults(fail_rate=0.25, seed=7)
    code, err, _, seen = run_with(faults, tmp_path, capsys, "--max-retries", "8")
    assert code == 0, err
    assert faults.injected.get("fail", 0) >= 1
    assert seen == 18 + faults.injected["fail"]
    assert docids_by_qid(tmp_path / "out.jsonl") == reference


def test_truncated_answer_is_asked_again_with_more_tokens(tmp_path, capsys, reference):
    recorded: list[int] = []

    class Watch(Faults):
        def intercept(self, handler, body, path):  # type: ignore[override]
            recorded.append(int(body["max_tokens"]))
            return super().intercept(handler, body, path)

    faults = Watch(truncate_first=1)
    code, err, manifest, seen = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert seen == 19 and faults.injected == {"truncate": 1}
    budget = recorded[0]  # every window of 20 gets the same budget; the retry had twice that
    assert sorted(recorded) == [budget] * 18 + [2 * budget]
    assert docids_by_qid(tmp_path / "out.jsonl") == reference  # and its full answer was used
    assert manifest["totals"]["calls"] == 19
    assert manifest["totals"]["repairs"]["ok"] == 18


def test_answers_always_truncated_are_repaired_not_fatal(tmp_path, capsys):
    faults = Faults(truncate_first=10_000)
    code, err, manifest, seen = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert seen == 2 * 18  # each window retried exactly once
    assert manifest["totals"]["repairs"]["missing"] > 0
    assert all(len(d) == 100 for d in docids_by_qid(tmp_path / "out.jsonl").values())


@pytest.mark.parametrize("kind", ["empty", "garbage"])
def test_empty_or_garbage_answers_are_repaired_and_counted(tmp_path, capsys, kind):
    faults = Faults(**{f"{kind}_first": 3})
    code, err, manifest, seen = run_with(faults, tmp_path, capsys)
    assert code == 0, err
    assert seen == 18
    assert manifest["totals"]["repairs"]["wrong_format"] == 3
    out = read_jsonl(tmp_path / "out.jsonl")
    assert all(sorted(c["docid"] for c in r["candidates"]) for r in out)
    assert [len(r["candidates"]) for r in out] == [100, 100]


def test_on_error_skip_reports_the_failed_query_and_finishes_the_others(
    tmp_path, capsys, reference
):
    bad = QIDS[0]
    faults = Faults(fail_queries=frozenset({bad}), status=503)
    code, err, manifest, _ = run_with(
        faults, tmp_path, capsys, "--on-error", "skip", "--max-retries", "1"
    )
    assert code == 1
    out = {r["qid"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert "HTTP 503" in out[bad]["error"]
    input_order = [c["docid"] for c in read_jsonl(CANDIDATES)[0]["candidates"]]
    assert [c["docid"] for c in out[bad]["candidates"]] == input_order
    assert [c["docid"] for c in out[QIDS[1]]["candidates"]] == reference[QIDS[1]]
    assert "error" not in out[QIDS[1]]
    assert "HTTP 503" in manifest["failed"][bad]
    assert manifest["totals"]["failed_queries"] == 1


def test_on_error_fail_stops_cleanly_and_keeps_what_was_finished(tmp_path, capsys, reference):
    bad = QIDS[1]
    faults = Faults(fail_queries=frozenset({bad}), status=500)
    port = free_port()  # the same endpoint again below: a resumed run must use the same one
    code, err, manifest, _ = run_with(
        faults, tmp_path, capsys, "--max-retries", "1", "--concurrency", "1", port=port
    )
    assert code == 2
    assert f"query {bad} failed" in err and "HTTP 500" in err
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["qid"] for r in out] == [QIDS[0]]  # finished before the failure: kept
    assert [c["docid"] for c in out[0]["candidates"]] == reference[QIDS[0]]
    assert manifest["complete"] is False
    assert "HTTP 500" in manifest["stopped_by"] and bad in manifest["failed"]
    # Run again once the server is healthy: it resumes and completes.
    with simulator(port=port) as sim:
        argv = rerank_argv(sim, CANDIDATES, tmp_path / "out.jsonl", tmp_path / "c.sqlite", *LIMIT)
        assert run_cli(argv, capsys)[0] == 0
        assert sim.state.per_query[QIDS[0]] == 0
    assert docids_by_qid(tmp_path / "out.jsonl") == reference


def test_simulate_command_accepts_the_fault_switches():
    from permrank.cli.main import build_parser
    from permrank.sim.faults import faults_from_args

    args = build_parser().parse_args(
        "simulate --data x --fail-first 2 --fail-status 429 --retry-after 1.5 --fail-rate 0.1 "
        "--delay 3 --delay-first 1 --cut-first 1 --cut-mode close --restart-after 9 "
        "--restart-for 2 --empty-first 1 --truncate-first 1 --garbage-first 1 "
        "--fail-query 42".split()
    )
    faults = faults_from_args(args)
    assert faults is not None
    assert (faults.fail_first, faults.status, faults.retry_after) == (2, 429, 1.5)
    assert (faults.cut_mode, faults.restart_after, faults.fail_queries) == (
        "close",
        9,
        frozenset({"42"}),
    )
    assert faults_from_args(build_parser().parse_args(["simulate", "--data", "x"])) is None
