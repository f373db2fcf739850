"""`--method score`: a learned head's scores through the endpoint's rerank API.

Against the simulator (noiseless, a perfect scorer) each API shape, and `auto` against servers
serving only one shape, must give the best order a perfect scorer gives; requests are batched,
cached, retried and counted like every other method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from permrank.cli.main import main
from permrank.engine.methods import get_method
from permrank.engine.methods.score import Score, relevance_scores
from permrank.engine.reranker import Reranker
from permrank.runs.evaluate import read_qrels
from permrank.runs.io import read_requests
from permrank.sim.server import Corpus, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"
MODEL = "permrank-simulator"
SHAPES = {"rerank": "/v1/rerank", "tei": "/rerank", "score": "/v1/score"}


class OnlyServes:
    """Simulator fault hook: the server answers 404 on every rerank route but ``path``, and
    fails the first ``failures`` requests to it with a 503."""

    def __init__(self, path: str | None, failures: int = 0):
        self.path = path
        self.failures = failures
        self.seen: list[str] = []

    def intercept(self, handler: Any, body: dict[str, Any], path: str) -> bool:
        self.seen.append(path)
        if self.path is not None and path != self.path:
            handler._send(404, {"error": {"message": f"no route {path}"}})
            return True
        if self.failures > 0:
            self.failures -= 1
            handler._send(503, {"error": {"message": "busy"}})
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return {"only": self.path}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")


@pytest.fixture(scope="module")
def qrels() -> dict[str, dict[str, int]]:
    return read_qrels(str(DL19_5Q / "qrels.txt"))


def perfect(qrels: dict[str, dict[str, int]], qid: str, docids: list[str]) -> list[str]:
    """The order a perfect scorer gives: by grade, ties in input order."""
    grades = qrels.get(qid, {})
    return sorted(docids, key=lambda d: -grades.get(d, 0))


def rerank_file(tmp_path: Path, base_url: str, *flags: str) -> tuple[list[dict], dict]:
    output = tmp_path / "out.jsonl"
    code = main(
        [
            "rerank",
            "--input",
            str(DL19_5Q / "candidates.jsonl"),
            "--output",
            str(output),
            "--base-url",
            base_url,
            "--model",
            MODEL,
            "--method",
            "score",
            "--overwrite",
            "-q",
            *flags,
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    return lines, json.loads(Path(f"{output}.manifest.json").read_text())


@pytest.mark.parametrize("api", ["rerank", "tei", "score"])
def test_each_shape_reaches_the_perfect_order(
    corpus: Corpus, qrels: dict, tmp_path: Path, api: str
) -> None:
    hook = OnlyServes(SHAPES[api])
    with Simulator(corpus, faults=hook) as sim:
        lines, manifest = rerank_file(tmp_path, sim.base_url, "--score-api", api, "--no-cache")
    for line, request in zip(lines, read_requests(str(DL19_5Q / "candidates.jsonl")), strict=True):
        docids = [c["docid"] for c in line["candidates"]]
        assert docids == perfect(qrels, line["qid"], [c.docid for c in request.candidates])
    assert set(hook.seen) == {SHAPES[api]}
    # 100 candidates in batches of 32: 4 requests a query, each counted.
    assert manifest["totals"]["calls"] == 5 * 4
    assert manifest["parameters"]["method"]["resolved_api"] == api


@pytest.mark.parametrize("api", ["rerank", "tei", "score"])
def test_auto_finds_the_shape_served(corpus: Corpus, qrels: dict, api: str) -> None:
    request = next(iter(read_requests(str(DL19_5Q / "candidates.jsonl"))))
    hook = OnlyServes(SHAPES[api])
    with Simulator(corpus, faults=hook) as sim:
        with Reranker(MODEL, sim.base_url, method="score") as reranker:
            ranking = reranker.rank(request.query.text, request.candidates)
            assert reranker.method.describe()["resolved_api"] == api
    assert ranking.docids == perfect(
        qrels, request.query.qid, [c.docid for c in request.candidates]
    )


def test_batches_cache_and_retries(corpus: Corpus, qrels: dict, tmp_path: Path) -> None:
    hook = OnlyServes("/v1/rerank", failures=2)
    cache = tmp_path / "cache.sqlite"
    flags = ("--score-api", "rerank", "--score-batch", "7", "--cache", str(cache))
    with Simulator(corpus, faults=hook) as sim:
        lines, manifest = rerank_file(tmp_path, sim.base_url, *flags)
        asked = sim.state.requests
        again, manifest2 = rerank_file(tmp_path, sim.base_url, *flags)
        assert sim.state.requests == asked  # the second run is answered by the cache
    per_query = math.ceil(100 / 7)
    assert manifest["totals"]["calls"] == 5 * per_query
    assert manifest["totals"]["prompt_tokens"] > 0
    assert manifest2["totals"]["calls"] == 0
    assert manifest2["totals"]["cached_calls"] == 5 * per_query
    assert [line["candidates"] for line in again] == [line["candidates"] for line in lines]
    assert hook.failures == 0  # the two 503s were retried


def test_relevance_scores_are_the_model_scores(corpus: Corpus, qrels: dict) -> None:
    request = next(iter(read_requests(str(DL19_5Q / "candidates.jsonl"))))
    with Simulator(corpus) as sim, Reranker(MODEL, sim.base_url, method="score") as reranker:
        ranking = reranker.rank(request.query.text, request.candidates[:30])
    scores = relevance_scores(ranking, model_scores=True)
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    grades = qrels[request.query.qid]
    best = grades.get(ranking.docids[0], 0)
    assert scores[0] == pytest.approx(1 / (1 + math.exp(-(2 * best - 3))))


def test_a_server_without_a_rerank_api_is_a_clear_error(corpus: Corpus, tmp_path: Path) -> None:
    request = next(iter(read_requests(str(DL19_5Q / "candidates.jsonl"))))
    with Simulator(corpus, faults=OnlyServes("/nowhere")) as sim:
        with Reranker(MODEL, sim.base_url, method="score") as reranker:
            with pytest.raises(Exception, match="serves none of the rerank APIs"):
                reranker.rank(request.query.text, request.candidates[:5])


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="score api"):
        get_method("score", api="cohere")
    with pytest.raises(ValueError, match="batch"):
        Score(batch=0)


def test_cli_flag_applies_only_to_score(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "rerank",
            "--input",
            str(DL19_5Q / "candidates.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            MODEL,
            "--score-api",
            "tei",
        ]
    )
    assert code == 2
    assert "--score-api does not apply to --method listwise" in capsys.readouterr().err
