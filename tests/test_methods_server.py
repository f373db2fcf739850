"""Scoring methods against a real model: llama.cpp's server with SmolLM2-135M-Instruct.

A 135M model cannot rank; these tests check the real path (logprobs shapes, token ids, grammar
forcing, fallbacks, usage) and invariants of the scores, never the quality of the order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from permrank.core.types import Request
from permrank.engine.methods import LogprobsUnavailable
from permrank.engine.reranker import Reranker
from permrank.runs.io import read_requests

pytestmark = pytest.mark.server

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "dl19-3q20" / "candidates.jsonl"


@pytest.fixture(scope="module")
def llama() -> Iterator[object]:
    llamacpp = pytest.importorskip("permrank.servers.llamacpp")
    try:
        server = llamacpp.LlamaServer("smollm2-135m", ctx=2048)
    except Exception as exc:  # noqa: BLE001 - no binary or no model: skip, say why
        pytest.skip(f"no embedded llama.cpp server: {exc}")
    with server:
        yield server


@pytest.fixture(scope="module")
def request3() -> Request:
    request = next(read_requests(FIXTURE))
    return request.model_copy(update={"candidates": request.candidates[:3]})


def reranker(llama: object, method: str, **options: object) -> Reranker:
    return Reranker(
        llama.model,  # type: ignore[attr-defined]
        llama.base_url,  # type: ignore[attr-defined]
        method=method,
        method_options=options,
        max_passage_tokens=32,
        window_size=3,
        step=2,
        concurrency=2,
    )


def check_permutation(request: Request, docids: list[str]) -> None:
    assert sorted(docids) == sorted(c.docid for c in request.candidates)


@pytest.mark.parametrize("normalisation", ["softmax", "logprob", "vocab"])
def test_pointwise_reads_real_first_token_logprobs(llama, request3, normalisation):
    with reranker(llama, "pointwise", normalisation=normalisation) as r:
        ranking = r.rank(request3.query.text, request3.candidates)
    check_permutation(request3, ranking.docids)
    assert ranking.usage.calls == 3 and ranking.usage.completion_tokens == 3
    assert ranking.usage.prompt_tokens > 3 * 20  # the server's own count of a real prompt
    scores = [t.score for t in ranking.trace]
    assert all(s is not None and math.isfinite(s) for s in scores)
    if normalisation == "logprob":
        assert all(s <= 0.0 for s in scores)
    else:
        assert all(0.0 < s < 1.0 for s in scores)
    by_docid = {t.docids[0]: t.score for t in ranking.trace}
    assert [by_docid[d] for d in ranking.docids] == sorted(scores, reverse=True)


def test_pointwise_completions_route_reads_the_same_shape(llama, request3):
    with reranker(llama, "pointwise", route="completions") as r:
        ranking = r.rank(request3.query.text, request3.candidates)
    check_permutation(request3, ranking.docids)
    assert all(0.0 < t.score < 1.0 for t in ranking.trace)


def test_likelihood_forces_the_query_tokens_on_llama_cpp(llama, request3):
    with reranker(llama, "likelihood") as r:
        ranking = r.rank(request3.query.text, request3.candidates)
        described = r.manifest()["method"]
    assert described["resolved_mode"] == "forced"  # llama.cpp does not echo the prompt
    check_permutation(request3, ranking.docids)
    scores = [t.score for t in ranking.trace if t.score is not None]
    assert len(scores) == 3 and all(s < 0.0 and math.isfinite(s) for s in scores)
    # the echo probe is counted as a call; then one forced call per passage
    assert ranking.usage.calls == 4
    n_query_tokens = int(ranking.trace[-1].answer.split()[0])
    assert n_query_tokens >= len(request3.query.text.split())
    assert ranking.trace[-1].completion_tokens == n_query_tokens
    # the trace lists each query token's logprob; their mean is the passage's score
    for trace in ranking.trace:
        if trace.score is not None:
            each = [float(v) for v in trace.answer.split("(each: ")[1].rstrip(")").split()]
            assert len(each) == int(trace.answer.split()[0])
            assert sum(each) / len(each) == pytest.approx(trace.score, abs=1e-3)


def test_likelihood_echo_is_refused_clearly_by_llama_cpp(llama, request3):
    with reranker(llama, "likelihood", mode="echo") as r:
        with pytest.raises(LogprobsUnavailable, match="no logprobs for the query's tokens"):
            r.rank(request3.query.text, request3.candidates[:1])


def test_first_answers_a_window_from_one_token(llama, request3):
    with reranker(llama, "first") as r:
        ranking = r.rank(request3.query.text, request3.candidates)
    check_permutation(request3, ranking.docids)
    first_calls = [t for t in ranking.trace if t.completion_tokens == 1]
    assert first_calls, "no single-token window answer"
    for trace in ranking.trace:
        assert sorted(trace.permutation) == list(range(len(trace.docids)))
        if trace.repair.wrong_format:  # no identifier listed: a generated answer follows
            assert trace.completion_tokens == 1


def test_pairwise_preferences_from_real_logprobs(llama, request3):
    with reranker(llama, "pairwise", aggregation="heap", k=1) as r:
        ranking = r.rank(request3.query.text, request3.candidates)
    check_permutation(request3, ranking.docids)
    # a heap of one: each of the other two candidates is compared once, in both orders
    assert ranking.usage.calls == len(ranking.trace) == 4
    assert all(0.0 <= t.score <= 1.0 for t in ranking.trace)
    assert all(len(t.docids) == 2 for t in ranking.trace)
