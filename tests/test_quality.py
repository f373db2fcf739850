"""The whole pipeline on TREC DL19 against a noiseless simulator: the issue's quality bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from permrank import Reranker
from permrank.runs.evaluate import evaluate, read_qrels, read_run, run_of
from permrank.runs.io import read_requests
from permrank.sim.server import Corpus, Simulator

DL19 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "trec-dl19"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DL19 / "candidates.jsonl").exists(),
        reason=f"needs the shared DL19 data at {DL19} (../shared/data beside the repository)",
    ),
]


def test_dl19_one_pass_noiseless() -> None:
    requests = list(read_requests(DL19 / "candidates.jsonl"))
    qrels = read_qrels(DL19 / "qrels.txt")
    assert len(requests) == 43 and all(len(r.candidates) == 100 for r in requests)
    with Simulator(Corpus.from_dir(DL19)) as sim:
        with Reranker("sim", sim.base_url, window_size=20, step=10, passes=1) as reranker:
            rankings = reranker.rerank_batch(requests)
        stats = sim.state.stats()
    before = evaluate(read_run(DL19 / "candidates.jsonl"), qrels)["nDCG@10"]
    after = evaluate(run_of(rankings), qrels)["nDCG@10"]
    assert before == pytest.approx(0.5058, abs=5e-4)  # BM25, as published
    assert after >= 0.89
    assert stats["per_query"] == {r.query.qid: 9 for r in requests}
    assert stats["requests"] == 43 * 9 and stats["unmatched"] == 0
    assert stats["temperatures"] == {"0.0": 43 * 9}
    assert stats["passages_shown"] == 43 * 9 * 20  # every passage of every window was found
    # every window answered in full (the simulator gives some back in the shown order: echo)
    assert all(r.usage.calls == 9 for r in rankings)
    assert all(r.usage.repairs.get("ok", 0) + r.usage.repairs.get("echo", 0) == 9 for r in rankings)
