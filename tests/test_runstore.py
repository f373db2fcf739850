"""One run store for ``rerank`` and ``distill``: an output remembers the settings that made it; a
rerun with other settings is refused before any model call with the output untouched, the same
settings resume it, and the totals count every session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_support import (
    CANDIDATES,
    docids_by_qid,
    recorded_simulator,
    rerank_argv,
    run_cli,
)

from permrank.core.types import Usage
from permrank.runs.store import RunStore, SettingsChanged, differences, flatten


@pytest.fixture(scope="module")
def sim():
    with recorded_simulator() as running:
        yield running


def first_run(sim, tmp_path: Path, capsys, *extra: str) -> tuple[Path, bytes]:
    output = tmp_path / "out.jsonl"
    argv = rerank_argv(sim, CANDIDATES, output, None, "--no-cache", "--limit", "2", *extra)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    return output, output.read_bytes()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--window-size", "10", "--step", "5"], ["strategy.window_size: 20 -> 10"]),
        (["--prompt", "rankzephyr"], ["template.name", "template.sha256"]),
        (["--temperature", "0.7"], ["sampling.temperature: 0.0 -> 0.7"]),
        (["--seed", "3"], ["sampling.seed: null -> 3"]),
        (["--depth", "30"], ["depth: null -> 30"]),
        (["--max-passage-tokens", "100"], ["budget.max_passage_tokens: 300 -> 100"]),
        (["--strategy", "tournament"], ["strategy.name"]),
        (["--method", "pointwise"], ["method.name"]),
    ],
)
def test_other_settings_are_refused_and_the_output_left_as_it_was(
    sim, tmp_path, capsys, flags, named
):
    output, before = first_run(sim, tmp_path, capsys)
    record = Path(f"{output}.run.json").read_bytes()
    manifest = Path(f"{output}.manifest.json").read_bytes()
    sent = len(sim.recorder.bodies)
    argv = rerank_argv(sim, CANDIDATES, output, None, "--no-cache", "--limit", "3", *flags)
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert len(sim.recorder.bodies) == sent, "a model call was made"
    assert output.read_bytes() == before  # byte for byte
    assert Path(f"{output}.run.json").read_bytes() == record
    assert Path(f"{output}.manifest.json").read_bytes() == manifest
    assert "was made with other settings" in err
    for name in named:
        assert name in err
    assert "--overwrite" in err and "another --output" in err
    # --overwrite starts afresh with the new settings.
    code, _, err = run_cli(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert len(docids_by_qid(output)) == 3


def test_another_input_with_the_same_qids_is_refused(sim, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    lines = CANDIDATES.read_text().splitlines(keepends=True)
    source.write_text("".join(lines))
    output = tmp_path / "out.jsonl"
    argv = rerank_argv(sim, source, output, None, "--no-cache", "--limit", "1")
    assert run_cli(argv, capsys)[0] == 0
    before = output.read_bytes()
    changed = json.loads(lines[1])
    changed["candidates"] = changed["candidates"][::-1]
    source.write_text(lines[0] + json.dumps(changed) + "\n" + "".join(lines[2:]))
    code, _, err = run_cli(argv[:-2] + ["--limit", "2"], capsys)
    assert code == 2 and "input.sha256" in err
    assert output.read_bytes() == before


def test_limit_is_not_a_setting_more_queries_resume(sim, tmp_path, capsys):
    output, before = first_run(sim, tmp_path, capsys)
    first = json.loads(Path(f"{output}.manifest.json").read_text())["totals"]
    sent = len(sim.recorder.bodies)
    argv = rerank_argv(sim, CANDIDATES, output, None, "--no-cache", "--limit", "4")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert output.read_bytes().startswith(before)  # the first two kept as they were
    assert len(docids_by_qid(output)) == 4
    assert len(sim.recorder.bodies) - sent == 2 * 9  # only the two new queries were asked
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    totals = manifest["totals"]
    # The totals count both sessions: calls, tokens, seconds, repairs.
    assert totals["queries"] == 4 and manifest["resumed_queries"] == 2
    assert totals["calls"] == first["calls"] + 18 == 36
    assert totals["prompt_tokens"] > first["prompt_tokens"] > 0
    # every window answered in full: ok, or the shown order given back (echo)
    assert totals["repairs"].get("ok", 0) + totals["repairs"].get("echo", 0) == 36
    assert manifest["this_run"]["totals"]["calls"] == 18
    assert manifest["seconds"] >= manifest["this_run"]["seconds"]
    record = json.loads(Path(f"{output}.run.json").read_text())
    assert record["sessions"] == 2 and record["totals"]["calls"] == 36


def test_an_output_without_a_record_is_not_resumed_blindly(sim, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    output.write_text(CANDIDATES.read_text().splitlines()[0] + "\n")
    before = output.read_bytes()
    argv = rerank_argv(sim, CANDIDATES, output, None, "--no-cache", "--limit", "2")
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "no record of the settings" in err and "--overwrite" in err
    assert output.read_bytes() == before


def test_refused_before_the_embedded_server_starts(sim, tmp_path, capsys, monkeypatch):
    """Without --base-url the refusal comes before llama.cpp is started."""
    from permrank.servers import llamacpp

    output, before = first_run(sim, tmp_path, capsys)
    started: list[object] = []
    monkeypatch.setattr(llamacpp.LlamaServer, "start", lambda self: started.append(self))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    argv = [
        "rerank",
        "--input",
        str(CANDIDATES),
        "--output",
        str(output),
        "--local-model",
        str(gguf),
        "--limit",
        "2",
        "--no-cache",
        "-q",
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and not started
    assert "endpoint:" in err and "local model file model.gguf" in err
    assert output.read_bytes() == before


def test_fingerprints_name_their_differences():
    old = flatten({"strategy": {"window_size": 20, "step": 10}, "model": "a"})
    new = flatten({"strategy": {"window_size": 10, "step": 10}, "seed": 1})
    assert differences(old, new) == {
        "strategy.window_size": (20, 10),
        "model": ("a", "(not recorded)"),
        "seed": ("(not recorded)", 1),
    }
    assert differences(old, new, only_new_keys=True) == {
        "strategy.window_size": (20, 10),
        "seed": ("(not recorded)", 1),
    }


def test_store_refuses_and_carries_totals(tmp_path):
    output = tmp_path / "out.jsonl"
    store = RunStore(output, tmp_path / "out.run.json")
    store.begin({"a": 1})
    output.write_text("x\n")
    store.finish(Usage(calls=3, prompt_tokens=10, failed_calls=1), 2.0)
    again = RunStore(output, tmp_path / "out.run.json")
    with pytest.raises(SettingsChanged) as refused:
        again.check({"a": 2})
    assert refused.value.differences == {"a": (1, 2)}
    again.begin({"a": 1})
    total = again.totals(Usage(calls=2))
    assert (total.calls, total.prompt_tokens, total.failed_queries) == (5, 10, 1)
    assert again.seconds(1.0) == 3.0
    afresh = RunStore(output, tmp_path / "out.run.json", overwrite=True)
    afresh.begin({"a": 2})
    assert afresh.totals(Usage()).calls == 0


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def distill_argv(sim, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--input",
        str(CANDIDATES),
        "--out",
        str(out),
        "--base-url",
        sim.base_url,
        "--model",
        sim.state.model,
        "--no-cache",
        "--depth",
        "20",
        "--limit",
        "2",
        "-q",
        *extra,
    ]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--window-size", "10", "--step", "5"], "strategy.window_size: 20 -> 10"),
        (["--temperature", "0.5"], "sampling.temperature: 0.0 -> 0.5"),
        (["--pair-top", "3"], "labels.pairs.top: 10 -> 3"),
        (["--depth", "30"], "depth: 20 -> 30"),
    ],
)
def test_distill_refuses_another_teacher_or_options(sim, tmp_path, capsys, flags, named):
    out = tmp_path / "labels"
    code, _, err = run_cli(distill_argv(sim, out), capsys)
    assert code == 0, err
    before = folder_bytes(out)
    sent = len(sim.recorder.bodies)
    argv = distill_argv(sim, out, *flags)
    if "--depth" in flags:
        argv = [a for i, a in enumerate(argv) if not (a == "--depth" or argv[i - 1] == "--depth")]
        argv += flags
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert named in err and "--overwrite" in err and "another --out" in err
    assert len(sim.recorder.bodies) == sent
    assert folder_bytes(out) == before  # every file byte for byte
    code, _, err = run_cli(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "stats.json").read_text())["queries"] == 2


def test_distill_resumes_with_the_same_teacher_and_counts_both_sessions(sim, tmp_path, capsys):
    out = tmp_path / "labels"
    assert run_cli(distill_argv(sim, out, "--limit", "1"), capsys)[0] == 0
    first = json.loads((out / "manifest.json").read_text())["totals"]
    assert first["calls"] == 1
    sent = len(sim.recorder.bodies)
    assert run_cli(distill_argv(sim, out, "--limit", "3"), capsys)[0] == 0
    assert len(sim.recorder.bodies) - sent == 2  # only the two new queries (one window each)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["calls"] == 3 and manifest["this_run"]["totals"]["calls"] == 2
    assert manifest["totals"]["queries"] == 3 and manifest["resumed_queries"] == 1


def test_a_record_without_its_output_carries_nothing(tmp_path):
    output = tmp_path / "out.jsonl"
    store = RunStore(output, tmp_path / "out.run.json")
    store.begin({"a": 1})
    store.finish(Usage(calls=7), 1.0)  # the output itself was never written (or was deleted)
    again = RunStore(output, tmp_path / "out.run.json")
    again.check({"a": 2})  # nothing to mix: not refused
    again.begin({"a": 1})
    assert again.totals(Usage()).calls == 0


def test_settings_that_do_not_change_results_resume(sim, tmp_path, capsys):
    """Defaults spelled out, another concurrency, timeout, cache or --limit: the same run."""
    output, before = first_run(sim, tmp_path, capsys)
    sent = len(sim.recorder.bodies)
    argv = rerank_argv(
        sim,
        CANDIDATES,
        output,
        tmp_path / "other.sqlite",
        "--limit",
        "2",
        "--window-size",
        "20",
        "--step",
        "10",
        "--passes",
        "1",
        "--temperature",
        "0",
        "--concurrency",
        "3",
        "--timeout",
        "50",
        "--max-retries",
        "2",
    )
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert output.read_bytes() == before
    assert len(sim.recorder.bodies) == sent  # nothing asked again
