"""Bad input is refused before any model call, with the file, the line, the field and a fix."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from reliability_support import (
    fixture_records,
    read_jsonl,
    recorded_simulator,
    rerank_argv,
    run_cli,
    write_jsonl,
)


@pytest.fixture(scope="module")
def sim():
    with recorded_simulator() as running:
        yield running


def good(n: int = 2) -> list[dict]:
    return fixture_records(limit=n, depth=20)


def refused(sim, capsys, tmp_path: Path, input_path: Path, *extra: str) -> str:
    """Run; assert it was refused before any model call; the error text."""
    before, answered = len(sim.recorder.bodies), sim.state.requests
    argv = rerank_argv(sim, input_path, tmp_path / "out.jsonl", tmp_path / "c.sqlite", *extra)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    assert len(sim.recorder.bodies) == before, "a model call was made"
    assert sim.state.requests == answered
    assert "permrank rerank: error:" in err
    return err


# -- the input file: each message names the file, the line and the field, and says what to do


def bad_line(tmp_path: Path, line: object, *, at: int = 2) -> Path:
    records: list[object] = good(3)
    records[at - 1] = line
    return write_jsonl(tmp_path / "in.jsonl", records)


def test_malformed_json(sim, capsys, tmp_path):
    path = bad_line(tmp_path, '{"qid": "1", "query": "x", "candidates": [')
    err = refused(sim, capsys, tmp_path, path)
    assert f"{path}:2: malformed JSON" in err and "fix or remove this line" in err


def test_line_not_an_object(sim, capsys, tmp_path):
    path = bad_line(tmp_path, "[1, 2]")
    err = refused(sim, capsys, tmp_path, path)
    assert f"{path}:2: expected a JSON object per line, got list" in err
    assert "write each query as" in err


DELETE = object()
RANK_LLM_BLANK_QUERY = {"query": {"qid": "9", "text": "  "}, "candidates": []}
RANK_LLM_NO_DOC = {
    "query": {"qid": "9", "text": "q"},
    "candidates": [{"docid": "a", "doc": {"segment": "x"}}, {"docid": "b"}],
}
# (where in the second record, new value or DELETE, what the message says, what it says to do)
RECORD_CASES = {
    "missing qid": (("qid",), DELETE, "field 'qid' is missing", "every query needs an id"),
    "missing query text": (
        ("query",),
        DELETE,
        "field 'query' is missing or empty",
        "every query needs its text",
    ),
    "blank query text, rank_llm layout": (
        (),
        RANK_LLM_BLANK_QUERY,
        "field 'query.text' is missing or empty",
        "every query needs its text",
    ),
    "candidates not a list": (
        ("candidates",),
        {"docid": "1"},
        "field 'candidates' is missing or not a list",
        "give the query's candidates as a list",
    ),
    "candidate not an object": (
        ("candidates", 4),
        "just text",
        "candidates[4] is not an object",
        "write each candidate",
    ),
    "missing candidate text": (
        ("candidates", 3, "text"),
        DELETE,
        "candidates[3].text is missing or not a string",
        "give the passage text",
    ),
    "empty candidate text": (
        ("candidates", 0, "text"),
        " \n ",
        "candidates[0].text is empty",
        "give the passage text",
    ),
    "missing docid": (
        ("candidates", 7, "docid"),
        DELETE,
        "candidates[7].docid is missing",
        "give every candidate an id",
    ),
    "rank_llm candidate without doc": (
        (),
        RANK_LLM_NO_DOC,
        "candidates[1].doc is missing",
        "keeps the text in 'doc'",
    ),
    "score not a number": (
        ("candidates", 2, "score"),
        "high",
        "candidates[2].score 'high' is not a number",
        "give a number or leave it out",
    ),
    "duplicate docid in one query": (
        ("candidates", 9, "docid"),
        "1:same",
        "candidates[9].docid '1:same' repeats candidates[2]",
        "remove the duplicate",
    ),
}


def edited(record: dict, where: tuple, value: object) -> dict:
    if not where:
        return value  # type: ignore[return-value]
    *path, last = where
    target = record
    for key in path:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return record


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_bad_record(sim, capsys, tmp_path, case):
    where, value, message, advice = RECORD_CASES[case]
    record = good(2)[1]
    record["candidates"][2]["docid"] = "1:same"
    path = bad_line(tmp_path, edited(record, where, value))
    err = refused(sim, capsys, tmp_path, path)
    assert f"{path}:2: {message}" in err  # the file, the line and the field
    assert advice in err  # and what to do


def test_duplicate_qids(sim, capsys, tmp_path):
    records = good(3)
    records[2]["qid"] = records[0]["qid"]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    err = refused(sim, capsys, tmp_path, path)
    assert f"{path}:3: qid {records[0]['qid']!r} repeats line 1" in err
    assert "each query must appear once" in err


def test_non_utf8_bytes(sim, capsys, tmp_path):
    lines = [json.dumps(r).encode() for r in good(3)]
    lines[1] = lines[1].replace(b'"query": "', b'"query": "caf\xe9 ', 1)  # Latin-1, not UTF-8
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    err = refused(sim, capsys, tmp_path, path)
    assert f"{path}:2: not valid UTF-8" in err and "convert the file to UTF-8" in err


def test_missing_input_file(sim, capsys, tmp_path):
    err = refused(sim, capsys, tmp_path, tmp_path / "nowhere.jsonl")
    assert f"{tmp_path / 'nowhere.jsonl'}: no such file: check the path" in err


def test_empty_candidate_list_is_passed_through_with_a_warning(sim, capsys, caplog, tmp_path):
    records = good(2)
    records[1]["candidates"] = []
    path = write_jsonl(tmp_path / "in.jsonl", records)
    before = len(sim.recorder.bodies)
    argv = rerank_argv(sim, path, tmp_path / "out.jsonl", tmp_path / "c.sqlite")
    assert run_cli(argv, capsys)[0] == 0
    assert f"{path}:2: query {records[1]['qid']} has no candidates" in caplog.text
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[1] == {**records[1], "candidates": []}
    assert len(sim.recorder.bodies) - before == 1  # only the first query's one window of 20


def test_huge_passage_is_cut_to_the_budget_never_sent_whole(sim, capsys, tmp_path):
    records = good(1)
    huge = "Quokkas are small." + " quokka" * 400_000  # ~2 MB
    records[0]["candidates"][5]["text"] = huge
    path = write_jsonl(tmp_path / "in.jsonl", records)
    before = len(sim.recorder.bodies)
    argv = rerank_argv(sim, path, tmp_path / "out.jsonl", tmp_path / "c.sqlite")
    argv += ["--max-passage-tokens", "100"]
    assert run_cli(argv, capsys)[0] == 0
    bodies = sim.recorder.bodies[before:]
    assert len(bodies) == 1
    for body in bodies:
        sent = json.dumps(body)
        assert len(sent) < 40_000
        assert sent.count(" quokka") <= 100
    assert any(" quokka quokka" in json.dumps(b) for b in bodies)  # it was shown, cut
    out = read_jsonl(tmp_path / "out.jsonl")
    assert any(c["text"] == huge for c in out[0]["candidates"])  # and written back whole


# -- templates and settings


def template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


def test_unknown_template_placeholder(sim, capsys, tmp_path):
    path = template(
        tmp_path,
        '[[messages]]\nrole = "user"\ncontent = "Rank for {question}: {passages}"\n',
    )
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    err = refused(sim, capsys, tmp_path, input_path, "--prompt", str(path))
    assert f"{path}: messages[1]: unknown placeholder {{question}}" in err
    assert "{passages}" in err and "{query}" in err


def test_template_without_passages(sim, capsys, tmp_path):
    path = template(tmp_path, '[[messages]]\nrole = "user"\ncontent = "Rank for {query}."\n')
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    err = refused(sim, capsys, tmp_path, input_path, "--prompt", str(path))
    assert f"{path}: the template never shows the passages" in err
    assert "put {passages} in a message" in err


def test_template_not_toml(sim, capsys, tmp_path):
    path = template(tmp_path, "[[messages]\nrole = ")
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    err = refused(sim, capsys, tmp_path, input_path, "--prompt", str(path))
    assert f"{path}: not a valid TOML template" in err


def test_unknown_template_name(sim, capsys, tmp_path):
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    err = refused(sim, capsys, tmp_path, input_path, "--prompt", "rankgtp")
    assert "no template 'rankgtp'" in err and "rankgpt" in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--window-size", "1"], "Use --window-size 20"),
        (["--step", "0"], "Use --step 10"),
        (["--window-size", "5", "--step", "8"], "Use a step <= the window size"),
        (["--top-k", "0"], "leave it out to rerank every candidate"),
        (["--passes", "0"], "passes must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--depth", "0"], "--depth must be at least 1"),
        (["--concurrency", "0"], "concurrency must be at least 1"),
        (["--context-window", "600"], "use a smaller --window-size or a larger --context-window"),
    ],
)
def test_impossible_settings(sim, capsys, tmp_path, flags, expected):
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    err = refused(sim, capsys, tmp_path, input_path, *flags)
    assert expected in err


# -- the endpoint: one probe before the run


def test_unreachable_endpoint(sim, capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free: nothing listens there once closed
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    argv = rerank_argv(sim, input_path, tmp_path / "out.jsonl", tmp_path / "c.sqlite")
    argv[argv.index("--base-url") + 1] = f"http://127.0.0.1:{port}/v1"
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert f"cannot reach the endpoint http://127.0.0.1:{port}/v1" in err
    assert "start the server, or check --base-url" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_unknown_model(sim, capsys, tmp_path):
    before = len(sim.recorder.bodies)
    input_path = write_jsonl(tmp_path / "in.jsonl", good(1))
    argv = rerank_argv(sim, input_path, tmp_path / "out.jsonl", tmp_path / "c.sqlite")
    argv[argv.index("--model") + 1] = "gpt-nonexistent"
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "does not serve model 'gpt-nonexistent'; it serves: permrank-simulator" in err
    assert "Give one of those to --model" in err
    assert len(sim.recorder.bodies) == before


def test_lines_past_the_limit_are_not_read(sim, capsys, tmp_path):
    path = bad_line(tmp_path, '{"qid": broken')
    argv = rerank_argv(sim, path, tmp_path / "out.jsonl", tmp_path / "c.sqlite", "--limit", "1")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1


def test_a_trec_run_given_as_input_is_explained(sim, capsys, tmp_path):
    path = tmp_path / "bm25.run"
    path.write_text("1 Q0 doc7 1 2.3 bm25\n1 Q0 doc9 2 2.1 bm25\n")
    err = refused(sim, capsys, tmp_path, path)
    assert f"{path}:1: this looks like a TREC run line" in err
    assert "must be JSONL" in err and "Convert the run" in err
