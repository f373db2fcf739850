"""The Python API: Reranker(model, base_url).rank(query, documents), sync and async."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from permrank import Candidate, Reranker
from permrank.core.types import Request
from permrank.runs.io import read_requests
from permrank.sim.server import Simulator


@pytest.fixture(scope="module")
def requests(dl19_5q: Path) -> list[Request]:
    return list(read_requests(dl19_5q / "candidates.jsonl"))


def grades_of(simulator: Simulator, qid: str) -> dict[str, int]:
    """Each passage text's grade, as the simulator judges it."""
    query = simulator.state.corpus.queries[qid]
    return {text: grade for _, text, grade in query.passages}


def normalised(text: str) -> str:
    return " ".join(text.split())


def assert_true_top_first(simulator: Simulator, request: Request, texts: list[str]) -> None:
    grades = grades_of(simulator, request.query.qid)
    got = [grades[normalised(t)] for t in texts]
    # One pass of 20/10 with a perfect judge puts the true top 10 first, in order.
    assert got[:10] == sorted(got, reverse=True)[:10]
    assert sorted(got) == sorted(grades[normalised(c.text)] for c in request.candidates)


def test_rank_strings(simulator: Simulator, requests: list[Request]) -> None:
    request = requests[0]
    documents = [c.text for c in request.candidates]
    with Reranker("sim", simulator.base_url) as reranker:
        ranking = reranker.rank(request.query.text, documents)
    assert sorted(ranking.docids, key=int) == [str(i) for i in range(len(documents))]
    assert [documents[int(d)] for d in ranking.docids] == [c.text for c in ranking.candidates]
    assert_true_top_first(simulator, request, [c.text for c in ranking.candidates])
    assert len(ranking.trace) == 9 and ranking.usage.calls == 9 and ranking.usage.rounds == 9
    first = ranking.trace[0]
    assert first.docids == [str(i) for i in range(80, 100)]
    assert sorted(first.permutation) == list(range(20)) and first.repair.ok
    assert first.prompt_tokens > 0 and first.completion_tokens > 0 and first.latency_s > 0
    assert ranking.usage.prompt_tokens == sum(t.prompt_tokens for t in ranking.trace)


def test_candidates_as_strings_dicts_or_candidates_agree(
    simulator: Simulator, requests: list[Request]
) -> None:
    request = requests[1]
    as_strings = [c.text for c in request.candidates]
    as_dicts = [
        {"docid": c.docid, "contents": c.text, "source": "bm25"} for c in request.candidates
    ]
    as_candidates = list(request.candidates)
    with Reranker("sim", simulator.base_url, window_size=10, step=5) as reranker:
        orders = [
            [c.text for c in reranker.rank(request.query.text, docs).candidates]
            for docs in (as_strings, as_dicts, as_candidates)
        ]
        by_dict = reranker.rank(request.query.text, as_dicts)
    assert orders[0] == orders[1] == orders[2]
    assert by_dict.candidates[0].docid in {c.docid for c in request.candidates}
    assert by_dict.candidates[0].model_extra == {"source": "bm25"}


def test_arank(simulator: Simulator, requests: list[Request]) -> None:
    request = requests[2]
    reranker = Reranker("sim", simulator.base_url, top_k=30)

    async def go():
        try:
            return await reranker.arank(request.query.text, list(request.candidates), qid="q")
        finally:
            await reranker.aclose()

    ranking = asyncio.run(go())
    assert ranking.query.qid == "q"
    assert ranking.usage.calls == 2  # top 30 at 20/10: two windows
    assert ranking.docids[30:] == [c.docid for c in request.candidates[30:]]


def test_sync_rank_inside_a_running_event_loop(
    simulator: Simulator, requests: list[Request]
) -> None:
    request = requests[3]
    reranker = Reranker("sim", simulator.base_url)

    async def notebook_cell():
        # Jupyter runs cells inside an event loop; the sync form must still work there.
        return reranker.rank(request.query.text, [c.text for c in request.candidates])

    try:
        ranking = asyncio.run(notebook_cell())
    finally:
        reranker.close()
    assert_true_top_first(simulator, request, [c.text for c in ranking.candidates])


def test_rerank_batch(simulator: Simulator, requests: list[Request]) -> None:
    before = simulator.state.stats()["per_query"]
    with Reranker("sim", simulator.base_url, concurrency=4) as reranker:
        rankings = reranker.rerank_batch(requests)
    assert [r.query.qid for r in rankings] == [r.query.qid for r in requests]
    after = simulator.state.stats()["per_query"]
    for ranking, request in zip(rankings, requests, strict=True):
        assert ranking.usage.calls == 9
        assert after[request.query.qid] - before.get(request.query.qid, 0) == 9
        assert_true_top_first(simulator, request, [c.text for c in ranking.candidates])


def test_arerank_batch_and_astream(simulator: Simulator, requests: list[Request]) -> None:
    reranker = Reranker("sim", simulator.base_url, window_size=50, step=25)

    async def go():
        try:
            batch = await reranker.arerank_batch(requests[:2])
            streamed = [r async for r in reranker.astream(requests[:2])]
            return batch, streamed
        finally:
            await reranker.aclose()

    batch, streamed = asyncio.run(go())
    assert [r.docids for r in batch] == [r.docids for r in streamed]
    assert all(r.usage.calls == 3 for r in batch)  # 100 at 50/25: 50-100, 25-75, 0-50


def test_one_candidate_needs_no_model() -> None:
    # Nothing listens on port 9: a single candidate must not even try to connect.
    with Reranker("sim", "http://127.0.0.1:9/v1") as reranker:
        ranking = reranker.rank("anything", ["only passage"])
    assert [c.text for c in ranking.candidates] == ["only passage"]
    assert ranking.usage.calls == 0


def test_rank_and_candidate_values(simulator: Simulator, requests: list[Request]) -> None:
    request = requests[4]
    documents = [Candidate(docid=c.docid, text=c.text, score=c.score) for c in request.candidates]
    with Reranker("sim", simulator.base_url, prompt="rankzephyr", seed=3) as reranker:
        ranking = reranker.rank(request.query.text, documents[:20])
        manifest = reranker.manifest()
    assert ranking.usage.calls == 1
    assert {c.docid for c in ranking.candidates} == {c.docid for c in documents[:20]}
    assert manifest["template"]["name"] == "rankzephyr"
    assert manifest["sampling"]["seed"] == 3


def test_one_reranker_across_event_loops(simulator: Simulator, requests: list[Request]) -> None:
    # A script may call asyncio.run(arank(...)) again and again, and mix in the sync form.
    request = requests[0]
    documents = [c.text for c in request.candidates[:20]]
    reranker = Reranker("sim", simulator.base_url)
    try:
        first = reranker.rank(request.query.text, documents)
        again = [asyncio.run(reranker.arank(request.query.text, documents)) for _ in range(2)]
        last = reranker.rank(request.query.text, documents)
    finally:
        reranker.close()
    assert first.docids == again[0].docids == again[1].docids == last.docids
