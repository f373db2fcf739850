"""Scoring methods end to end against the simulator (logprobs from the qrels)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from permrank.backends.openai import OpenAIBackend
from permrank.cli.main import main
from permrank.core.types import Request
from permrank.engine.methods import LogprobsUnavailable
from permrank.engine.reranker import Reranker
from permrank.runs.evaluate import evaluate, read_qrels, run_of
from permrank.runs.io import read_requests
from permrank.sim.server import Corpus, Noise, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19_3Q20 = ROOT / "fixtures" / "dl19-3q20"
DL19_5Q = ROOT / "fixtures" / "dl19-5q"
DL19 = ROOT.parent / "shared" / "data" / "trec-dl19"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    corpus = Corpus.from_dir(DL19_5Q)
    with Simulator(corpus) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def requests20() -> list[Request]:
    return list(read_requests(DL19_3Q20 / "candidates.jsonl"))


@pytest.fixture(scope="module")
def grades() -> dict[str, dict[str, int]]:
    return read_qrels(DL19_3Q20 / "qrels.txt")


def ideal(request: Request, grades: dict[str, dict[str, int]]) -> list[str]:
    """Candidates by grade, ties in input order: what a noiseless judge must return."""
    g = grades.get(request.query.qid, {})
    return [c.docid for c in sorted(request.candidates, key=lambda c: -g.get(c.docid, 0))]


def rerank(sim: Simulator, requests: list[Request], method: str, **options: Any):
    with Reranker("sim", sim.base_url, method=method, method_options=options) as reranker:
        return reranker.rerank_batch(requests)


@pytest.mark.parametrize(
    "method, options, depth",
    [
        ("pointwise", {}, 20),
        ("pointwise", {"normalisation": "logprob"}, 20),
        ("pointwise", {"normalisation": "vocab", "route": "completions"}, 20),
        ("likelihood", {}, 20),
        ("likelihood", {"mode": "echo"}, 20),
        ("likelihood", {"mode": "prompt_logprobs"}, 20),
        ("pairwise", {"aggregation": "allpairs"}, 10),
    ],
)
def test_noiseless_scoring_methods_find_the_best_order(
    sim, requests20, grades, method, options, depth
):
    requests = [r.model_copy(update={"candidates": r.candidates[:depth]}) for r in requests20]
    for ranking, request in zip(rerank(sim, requests, method, **options), requests, strict=True):
        assert ranking.docids == ideal(request, grades), (method, options, request.query.qid)


@pytest.mark.parametrize("aggregation", ["heap", "sliding"])
def test_noiseless_pairwise_top_k_finds_the_best_top_k(sim, requests20, grades, aggregation):
    rankings = rerank(sim, requests20, "pairwise", aggregation=aggregation, k=4)
    for ranking, request in zip(rankings, requests20, strict=True):
        assert ranking.docids[:4] == ideal(request, grades)[:4]
        assert sorted(ranking.docids) == sorted(c.docid for c in request.candidates)


def test_pointwise_usage_counts_one_call_per_passage(sim, requests20):
    rankings = rerank(sim, requests20[:1], "pointwise", top_k=8)
    (ranking,) = rankings
    assert ranking.usage.calls == 8 == len(ranking.trace)
    assert ranking.usage.rounds == 1
    assert ranking.usage.completion_tokens == 8
    assert ranking.usage.prompt_tokens == sum(t.prompt_tokens for t in ranking.trace) > 0
    assert all(t.score is not None and 0.0 <= t.score <= 1.0 for t in ranking.trace)
    # the candidates after top_k keep their input order
    assert ranking.docids[8:] == [c.docid for c in requests20[0].candidates[8:]]


def test_pairwise_asks_each_pair_once_in_both_orders(sim, requests20):
    (ranking,) = rerank(sim, requests20[:1], "pairwise", aggregation="heap", k=3)
    shown = [tuple(t.docids) for t in ranking.trace]
    assert len(shown) == len(set(shown)) == ranking.usage.calls
    assert {(b, a) for a, b in shown} == set(shown)  # every pair in both orders
    assert ranking.usage.rounds == len(shown) // 2  # the heap asks one pair a round
    single = rerank(sim, requests20[:1], "pairwise", aggregation="heap", k=3, both_orders=False)
    assert single[0].usage.calls == ranking.usage.calls // 2


@pytest.mark.parametrize("window_size, step", [(20, 10), (30, 15)])
def test_first_in_the_sliding_window_matches_the_generated_permutations(sim, window_size, step):
    requests = list(read_requests(DL19_5Q / "candidates.jsonl"))
    options = dict(window_size=window_size, step=step)
    with Reranker("sim", sim.base_url, **options) as listwise:
        generated = listwise.rerank_batch(requests)
    # every identifier of a window must be among the listed alternatives to be ordered
    more = {"top_logprobs": 26}
    with Reranker("sim", sim.base_url, method="first", method_options=more, **options) as first:
        ranked = first.rerank_batch(requests)
    for by_first, by_text in zip(ranked, generated, strict=True):
        assert by_first.docids == by_text.docids, by_first.query.qid
        assert by_first.usage.calls == by_text.usage.calls
        for trace in by_first.trace:
            if len(trace.docids) <= 26:  # one identifier token
                assert len(trace.answer) == 1 and trace.completion_tokens == 1
            else:  # more passages than letters: the permutation was generated
                assert trace.answer.count(">") == len(trace.docids) - 1


def test_first_with_fewer_logprobs_than_passages_counts_the_missing(sim, requests20):
    (ranking,) = rerank(sim, requests20[:1], "first", top_logprobs=5)
    (trace,) = ranking.trace
    assert trace.repair.missing == 15 and ranking.usage.repairs["missing"] == 1


def test_noise_is_seeded_and_costs_quality(requests20, grades):
    corpus = Corpus.from_dir(DL19_5Q)
    runs = []
    for _ in range(2):
        with Simulator(corpus, noise=Noise(swap=0.3, seed=7)) as noisy:
            runs.append([r.docids for r in rerank(noisy, requests20, "pointwise")])
    assert runs[0] == runs[1]
    assert runs[0] != [ideal(r, grades) for r in requests20]


def test_a_backend_wrapper_sees_and_can_answer_every_method_request(sim, requests20):
    """A cache is a Backend wrapper: methods send everything through ``request``."""

    class Memo:
        def __init__(self, inner: OpenAIBackend):
            self.inner, self.model, self.endpoint = inner, inner.model, inner.endpoint
            self.answers: dict[str, dict[str, Any]] = {}

        async def request(self, route: str, body: dict[str, Any]):
            key = json.dumps([route, body], sort_keys=True)
            if key in self.answers:
                return {**self.answers[key], "cached": True}, 0.0
            answer, latency = await self.inner.request(route, body)
            self.answers[key] = answer
            return answer, latency

        async def complete(self, *args: Any, **kwargs: Any):
            return await self.inner.complete(*args, **kwargs)

        def describe(self) -> dict[str, Any]:
            return self.inner.describe()

        async def aclose(self) -> None:
            await self.inner.aclose()

    memo = Memo(OpenAIBackend(sim.base_url, "sim"))
    for method in ("pointwise", "likelihood", "first", "pairwise"):
        with Reranker(backend=memo, method=method, top_k=6) as reranker:
            first, again = (reranker.rerank_batch(requests20[:1])[0] for _ in range(2))
        assert first.docids == again.docids
        assert first.usage.calls > 0 and again.usage.calls == 0
        assert again.usage.cached_calls == first.usage.calls


def test_method_answers_are_kept_in_the_response_cache(sim, requests20, tmp_path):
    pytest.importorskip("permrank.backends.cache")  # the reliability work's SQLite cache
    path = tmp_path / "cache.sqlite"
    for method in ("pointwise", "likelihood", "first", "pairwise"):
        runs = []
        for _ in range(2):
            with Reranker("sim", sim.base_url, method=method, top_k=6, cache=path) as reranker:
                runs.append(reranker.rerank_batch(requests20[:1])[0])
        first, again = runs
        assert first.docids == again.docids
        assert first.usage.calls > 0 and again.usage.calls == 0, method
        assert again.usage.cached_calls == first.usage.calls
        assert again.usage.prompt_tokens == first.usage.prompt_tokens  # counts kept


class NoLogprobs(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = json.dumps(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_an_endpoint_without_logprobs_gets_a_clear_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoLogprobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        with Reranker("m", url, method="pointwise") as reranker:
            with pytest.raises(LogprobsUnavailable, match="answered without logprobs.*listwise"):
                reranker.rank("q", ["a passage", "another"])
    finally:
        server.shutdown()
        server.server_close()


def test_cli_method_flag(sim, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["rerank", "--input", str(DL19_3Q20 / "candidates.jsonl"), "--output", str(out)]
    argv += ["--qrels", str(DL19_3Q20 / "qrels.txt"), "--base-url", sim.base_url]
    argv += ["--model", sim.state.model, "--method", "pairwise"]
    argv += ["--pairwise", "heap", "--pairwise-k", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    before, after = re.search(r"nDCG@10: ([\d.]+) before -> ([\d.]+) after", printed).groups()
    assert float(after) > float(before)
    manifest = json.loads(out.with_name("out.jsonl.manifest.json").read_text())
    assert manifest["parameters"]["method"]["aggregation"] == "heap"
    assert main(argv[:-6] + ["--method", "pointwise", "--likelihood-mode", "echo"]) == 2
    assert "--likelihood-mode does not apply to --method pointwise" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not DL19.exists(), reason="needs ../shared/data/trec-dl19")
@pytest.mark.parametrize(
    "method, options",
    # one order per pair: the noiseless simulator has no position bias (both orders: the same
    # order at twice the calls, ~12,000 on DL19)
    [("pointwise", {}), ("pairwise", {"aggregation": "heap", "k": 10, "both_orders": False})],
)
def test_noiseless_dl19_reaches_the_best_order(method, options):
    requests = list(read_requests(DL19 / "candidates.jsonl"))
    qrels = read_qrels(DL19 / "qrels.txt")
    with Simulator(Corpus.from_dir(DL19)) as simulator:
        with Reranker(
            "sim", simulator.base_url, method=method, method_options=options, concurrency=16
        ) as reranker:
            rankings = reranker.rerank_batch(requests)
    score = evaluate(run_of(rankings), qrels, ["nDCG@10"])["nDCG@10"]
    assert score >= 0.89


def test_first_fits_a_window_to_the_context(sim, requests20, grades):
    with Reranker("sim", sim.base_url, method="first", context_window=1000) as reranker:
        (ranking,) = reranker.rerank_batch(requests20[:1])
    (trace,) = ranking.trace
    assert trace.prompt_tokens <= 1000 + 4  # the simulator adds 4 tokens per message
    assert ranking.docids[:5] == ideal(requests20[0], grades)[:5]


def test_cli_interpolate_fuses_with_the_first_stage(sim, tmp_path, capsys):
    """``--interpolate W``: W=0 is the first stage's order, W=1 the model's own; a weight out of
    range or a method that does not fuse is refused before any call."""
    inputs = DL19_3Q20 / "candidates.jsonl"
    argv = ["rerank", "--input", str(inputs), "--base-url", sim.base_url, "--no-cache", "-q"]
    argv += ["--model", sim.state.model, "--method", "likelihood", "--top-k", "20"]

    def order(*extra: str) -> dict[str, list[str]]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.jsonl"
        assert main(argv + ["--output", str(out), *extra]) == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return {r["qid"]: [c["docid"] for c in r["candidates"]][:20] for r in rows}

    given = {r.query.qid: [c.docid for c in r.candidates][:20] for r in read_requests(inputs)}
    model_only = order()
    assert model_only != given
    assert order("--interpolate", "0") == given
    assert order("--interpolate", "1") == model_only
    halfway = order("--interpolate", "0.5")
    assert halfway not in (given, model_only)
    manifest = json.loads(next(tmp_path.glob("*.manifest.json")).read_text())
    assert "interpolate" in manifest["parameters"]["method"]
    asked = sim.state.requests
    assert main(argv + ["--output", str(tmp_path / "x.jsonl"), "--interpolate", "1.5"]) == 2
    assert "interpolate must be between 0 and 1 (got 1.5)" in capsys.readouterr().err
    listwise = [a if a != "likelihood" else "listwise" for a in argv]
    assert main(listwise + ["--output", str(tmp_path / "y.jsonl"), "--interpolate", "0.5"]) == 2
    assert "--interpolate does not apply to --method listwise" in capsys.readouterr().err
    assert sim.state.requests == asked
