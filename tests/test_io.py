"""Reading and writing: both JSONL layouts, .gz, unknown fields, TREC runs, evaluation input."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import ir_measures
import pytest

from permrank.core.errors import InputError
from permrank.core.types import Ranking, Request
from permrank.runs.evaluate import evaluate, read_qrels, read_run, run_of
from permrank.runs.io import (
    ranking_line,
    read_requests,
    trec_lines,
    validate_requests,
    write_jsonl,
    write_trec,
)


def write_lines(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def reversed_ranking(request: Request) -> Ranking:
    """A ranking as a reranker would return it: here simply the input order reversed."""
    return Ranking(query=request.query, candidates=request.candidates[::-1], layout=request.layout)


OURS = {
    "qid": "q1",
    "query": "what is a flea",
    "split": "test",
    "candidates": [
        {"docid": "d1", "score": 12.5, "text": "Fleas are insects.", "title": None, "src": "bm25"},
        {"docid": 2, "score": "11.0", "text": "Dogs have fleas.", "title": "Dogs", "tags": [1]},
        {"docid": "d3", "contents": "A flea jumps far."},
    ],
}
RANK_LLM = {
    "query": {"text": "what is a flea", "qid": "q1", "lang": "en"},
    "candidates": [
        {"docid": "d1", "score": 12.5, "doc": {"segment": "Fleas are insects.", "url": "u1"}},
        {"docid": "d2", "score": 11.0, "doc": {"text": "Dogs have fleas.", "title": "Dogs"}},
        {"docid": "d3", "score": 9.0, "doc": {"contents": "A flea jumps far."}, "rank": 3},
    ],
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_read_our_layout(tmp_path: Path, suffix: str) -> None:
    (request,) = read_requests(write_lines(tmp_path / f"in{suffix}", [OURS]))
    assert request.layout == "permrank"
    assert (request.query.qid, request.query.text) == ("q1", "what is a flea")
    assert [c.docid for c in request.candidates] == ["d1", "2", "d3"]
    assert [c.text for c in request.candidates] == [
        "Fleas are insects.",
        "Dogs have fleas.",
        "A flea jumps far.",
    ]
    assert [c.score for c in request.candidates] == [12.5, 11.0, None]
    assert request.candidates[1].title == "Dogs"
    assert request.candidates[0].model_extra == {"src": "bm25"}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_read_rank_llm_layout(tmp_path: Path, suffix: str) -> None:
    (request,) = read_requests(write_lines(tmp_path / f"in{suffix}", [RANK_LLM]))
    assert request.layout == "rank_llm"
    assert request.query.qid == "q1" and request.query.model_extra == {"lang": "en"}
    assert [c.text for c in request.candidates] == [
        "Fleas are insects.",
        "Dogs have fleas.",
        "A flea jumps far.",
    ]
    assert request.candidates[1].title == "Dogs"


def test_rank_llm_fixture_matches_ours(dl19_5q: Path) -> None:
    ours = list(read_requests(dl19_5q / "candidates.jsonl"))
    theirs = list(read_requests(dl19_5q / "candidates.rank_llm.jsonl"))
    assert len(ours) == len(theirs) == 5
    assert validate_requests(dl19_5q / "candidates.rank_llm.jsonl") == (5, 500)
    for a, b in zip(ours, theirs, strict=True):
        assert b.layout == "rank_llm"
        assert a.query.qid == b.query.qid and a.query.text == b.query.text
        assert [c.docid for c in a.candidates] == [c.docid for c in b.candidates]
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert [c.score for c in a.candidates] == [c.score for c in b.candidates]


def test_our_layout_written_back_with_unknown_fields(tmp_path: Path) -> None:
    (request,) = read_requests(write_lines(tmp_path / "in.jsonl", [OURS]))
    record = json.loads(ranking_line(reversed_ranking(request)))
    assert record["qid"] == "q1" and record["query"] == "what is a flea"
    assert record["split"] == "test"  # an unknown top-level field is kept
    assert [c["docid"] for c in record["candidates"]] == ["d3", "2", "d1"]
    assert [c["score"] for c in record["candidates"]] == [3.0, 2.0, 1.0]
    d3, d2, d1 = record["candidates"]
    assert d1["src"] == "bm25" and d2["tags"] == [1] and d2["title"] == "Dogs"
    assert d1["text"] == "Fleas are insects." and d3["text"] == "A flea jumps far."
    # What we write reads back as the same request, in the new order.
    (again,) = read_requests(write_lines(tmp_path / "again.jsonl", [record]))
    assert again.layout == "permrank"
    assert [c.docid for c in again.candidates] == ["d3", "2", "d1"]
    assert again.query.model_extra == {"split": "test"}


def test_rank_llm_layout_written_back(tmp_path: Path) -> None:
    (request,) = read_requests(write_lines(tmp_path / "in.jsonl", [RANK_LLM]))
    record = json.loads(ranking_line(reversed_ranking(request)))
    assert set(record) == {"query", "candidates"}
    assert record["query"] == {"text": "what is a flea", "qid": "q1", "lang": "en"}
    d3, d2, d1 = record["candidates"]
    assert d1 == {
        "docid": "d1",
        "score": 1.0,
        "doc": {"segment": "Fleas are insects.", "url": "u1"},
    }
    assert d2 == {"docid": "d2", "score": 2.0, "doc": {"text": "Dogs have fleas.", "title": "Dogs"}}
    assert d3 == {"docid": "d3", "score": 3.0, "doc": {"contents": "A flea jumps far."}, "rank": 3}


def test_rank_llm_fixture_round_trip(dl19_5q: Path, tmp_path: Path) -> None:
    requests = list(read_requests(dl19_5q / "candidates.rank_llm.jsonl"))
    out = tmp_path / "out.jsonl.gz"
    write_jsonl(out, [reversed_ranking(r) for r in requests])
    with gzip.open(out, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    source = [json.loads(line) for line in open(dl19_5q / "candidates.rank_llm.jsonl")]
    for original, written in zip(source, records, strict=True):
        assert written["query"] == original["query"]
        n = len(original["candidates"])
        expected = [dict(c) for c in original["candidates"][::-1]]
        for rank, candidate in enumerate(expected):
            candidate["score"] = float(n - rank)
        assert written["candidates"] == expected
    again = list(read_requests(out))
    assert [c.docid for c in again[0].candidates] == [c.docid for c in requests[0].candidates][::-1]


def test_trec_run_lines(tmp_path: Path) -> None:
    (request,) = read_requests(write_lines(tmp_path / "in.jsonl", [OURS]))
    assert trec_lines(reversed_ranking(request), tag="mine") == (
        "q1 Q0 d3 1 3 mine\nq1 Q0 2 2 2 mine\nq1 Q0 d1 3 1 mine\n"
    )
    path = tmp_path / "run.trec"
    write_trec(path, [reversed_ranking(request)])
    assert read_run(path) == {"q1": {"d3": 3.0, "2": 2.0, "d1": 1.0}}
    assert path.read_text().splitlines()[0].split() == ["q1", "Q0", "d3", "1", "3", "permrank"]


def test_error_is_written_with_the_input_order(tmp_path: Path) -> None:
    (request,) = read_requests(write_lines(tmp_path / "in.jsonl", [OURS]))
    failed = Ranking(
        query=request.query, candidates=request.candidates, error="HTTP 503", layout="permrank"
    )
    record = json.loads(ranking_line(failed))
    assert record["error"] == "HTTP 503"
    assert [c["docid"] for c in record["candidates"]] == ["d1", "2", "d3"]


QRELS = "q1 0 d1 0\nq1 0 2 3\nq1 0 d3 1\nq2 0 x 1\n"


def test_eval_reads_trec_and_both_jsonl_layouts(tmp_path: Path) -> None:
    (tmp_path / "qrels.txt").write_text(QRELS)
    qrels = read_qrels(tmp_path / "qrels.txt")
    assert qrels == {"q1": {"d1": 0, "2": 3, "d3": 1}, "q2": {"x": 1}}
    (ours,) = read_requests(write_lines(tmp_path / "ours.jsonl", [OURS]))
    ranking = reversed_ranking(ours)  # d3, 2, d1
    write_trec(tmp_path / "run.trec", [ranking])
    write_jsonl(tmp_path / "run.jsonl", [ranking])
    write_lines(tmp_path / "rank_llm.jsonl", [RANK_LLM])  # d1, d2, d3: d2 is not "2"
    # By hand: gains 1, 3, 0 at ranks 1..3; ideal 3, 1, 0.
    dcg = 1 + 3 / math.log2(3)
    ideal = 3 + 1 / math.log2(3)
    from_trec = evaluate(read_run(tmp_path / "run.trec"), qrels, ["nDCG@10", "P@2"])
    from_jsonl = evaluate(read_run(tmp_path / "run.jsonl"), qrels, ["nDCG@10", "P@2"])
    assert from_trec == from_jsonl
    assert from_trec["nDCG@10"] == pytest.approx(dcg / ideal)
    assert from_trec["P@2"] == pytest.approx(1.0)
    from_rank_llm = evaluate(read_run(tmp_path / "rank_llm.jsonl"), qrels, ["nDCG@10"])
    assert from_rank_llm["nDCG@10"] == pytest.approx((1 / math.log2(4)) / ideal)
    assert run_of([ranking]) == read_run(tmp_path / "run.trec")


def test_eval_agrees_with_ir_measures_on_the_fixture(dl19_5q: Path, tmp_path: Path) -> None:
    qrels = read_qrels(dl19_5q / "qrels.txt")
    run = read_run(dl19_5q / "candidates.jsonl")
    assert run == read_run(dl19_5q / "candidates.rank_llm.jsonl")
    ours = evaluate(run, qrels, ["nDCG@10"])["nDCG@10"]
    reference = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[
        ir_measures.nDCG @ 10
    ]
    assert ours == pytest.approx(reference)
    assert 0 < ours < 1


def test_gz_input_is_the_same(dl19_5q: Path, tmp_path: Path) -> None:
    gz = tmp_path / "candidates.jsonl.gz"
    with open(dl19_5q / "candidates.jsonl", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = list(read_requests(dl19_5q / "candidates.jsonl"))
    assert list(read_requests(gz)) == plain
    assert read_run(gz) == read_run(dl19_5q / "candidates.jsonl")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"qid": "1", "query": "q", "candidates": [', "malformed JSON"),
        ('{"query": "q", "candidates": []}', "field 'qid' is missing"),
        ('{"qid": "1", "query": "", "candidates": []}', "field 'query' is missing or empty"),
        ('{"qid": "1", "query": "q"}', "field 'candidates' is missing"),
        ('{"qid": "1", "query": "q", "candidates": [{"text": "t"}]}', "candidates[0].docid"),
        (
            '{"qid": "1", "query": "q", "candidates": [{"docid": "a", "text": "t"}, '
            '{"docid": "a", "text": "u"}]}',
            "candidates[1].docid 'a' repeats candidates[0]",
        ),
        ('{"qid": "1", "query": "q", "candidates": [{"docid": "a"}]}', "candidates[0].text"),
        (
            '{"qid": "1", "query": "q", "candidates": [{"docid": "a", "text": "t", '
            '"score": "high"}]}',
            "candidates[0].score 'high' is not a number",
        ),
        ('{"query": {"qid": "1", "text": "q"}, "candidates": [{"docid": "a"}]}', ".doc is missing"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(OURS) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        validate_requests(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_repeated_qid_is_refused(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "dup.jsonl", [OURS, OURS])
    with pytest.raises(InputError, match=r"dup.jsonl:2: qid 'q1' repeats line 1"):
        validate_requests(path)


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        validate_requests(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(OURS).encode() + b"\n" + b'{"qid": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not valid UTF-8"):
        validate_requests(latin)
    bad_qrels = tmp_path / "qrels.txt"
    bad_qrels.write_text("q1 0 d1\n")
    with pytest.raises(InputError, match=r"qrels.txt:1: a qrels line has 4 fields"):
        read_qrels(bad_qrels)
    bad_run = tmp_path / "run.trec"
    bad_run.write_text("q1 Q0 d1 1 high tag\n")
    with pytest.raises(InputError, match=r"run.trec:1: score 'high' is not a number"):
        read_run(bad_run)
