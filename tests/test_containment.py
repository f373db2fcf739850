"""Failures stay contained: a lost query's sibling windows are cancelled, ``skip`` covers every
per-query error (not only the backend's), and a failed query keeps the usage it really spent."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from reliability_support import CANDIDATES, read_jsonl, rerank_argv, run_cli, simulator

from permrank import Reranker
from permrank.core.types import Query, Request
from permrank.runs.io import read_requests
from permrank.sim.faults import Faults, _query_of

QIDS = [r["qid"] for r in read_jsonl(CANDIDATES)]


def test_a_failed_window_cancels_its_siblings(tmp_path, capsys):
    """Tournament: the first round asks 5 windows at once. The first fails for good; the four
    others (waiting for the one connection) are cancelled, never sent, while the run goes on
    with the next query (``skip``)."""
    faults = Faults(fail_queries=frozenset({QIDS[0]}), status=500)
    with simulator(faults=faults) as sim:
        argv = rerank_argv(
            sim,
            CANDIDATES,
            tmp_path / "out.jsonl",
            None,
            "--no-cache",
            "--limit",
            "2",
            "--strategy",
            "tournament",
            "--concurrency",
            "1",
            "--max-retries",
            "0",
            "--on-error",
            "skip",
        )
        code, _, err = run_cli(argv, capsys)
        answered = sim.state.per_query[QIDS[1]]
    assert code == 1, err
    records = {r["qid"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert "HTTP 500" in records[QIDS[0]]["error"] and "error" not in records[QIDS[1]]
    assert answered == 10  # the other query: its 10 windows, unharmed
    # With gather the 5 windows of the round would all have been sent (and failed).
    assert faults.injected["fail"] <= 2, faults.injected


class NoLogprobsFor(Faults):
    """Answers the requests of one query without logprobs (with usage), like a server that
    drops them; every other request is answered by the simulator."""

    def __init__(self, qid: str):
        super().__init__()
        self.qid = qid
        self.answered = 0
        self.lock = threading.Lock()

    def intercept(self, handler: Any, body: dict[str, Any], path: str) -> bool:
        if _query_of(handler, body) != self.qid:
            return False
        with self.lock:
            self.answered += 1
        handler._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Yes"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
            },
        )
        return True


def test_skip_covers_missing_logprobs_and_keeps_the_usage_spent(tmp_path, capsys):
    faults = NoLogprobsFor(QIDS[0])
    output = tmp_path / "out.jsonl"
    with simulator(faults=faults) as sim:
        argv = rerank_argv(
            sim,
            CANDIDATES,
            output,
            None,
            "--no-cache",
            "--limit",
            "2",
            "--depth",
            "5",
            "--method",
            "pointwise",
            "--on-error",
            "skip",
            "--concurrency",
            "1",
        )
        code, _, err = run_cli(argv, capsys)
    assert code == 1, err
    records = {r["qid"]: r for r in read_jsonl(output)}
    assert "logprobs" in records[QIDS[0]]["error"]  # the reason, in the output
    assert "error" not in records[QIDS[1]]
    manifest = json.loads(output.with_name("out.jsonl.manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["failed_queries"] == 1 and list(manifest["failed"]) == [QIDS[0]]
    # The failed query's answers are counted: 5 good ones for the other query, and those the
    # broken query was given before it failed (one in flight when it failed may be cancelled
    # before its answer is read: the server answered it, the client never saw it).
    assert faults.answered >= 1
    assert 5 + 1 <= totals["calls"] <= 5 + faults.answered
    assert totals["prompt_tokens"] >= 50
    assert "failed_calls" not in totals


def test_the_api_skips_a_template_overflow_of_one_query():
    """A query too long for the context fails alone (TemplateError), with on_error="skip"."""
    good = next(iter(read_requests(CANDIDATES)))
    good.candidates = good.candidates[:4]
    long_query = " ".join(f"word{i}" for i in range(300))
    bad = Request(query=Query(qid="long", text=long_query), candidates=good.candidates)
    with simulator() as sim:
        with Reranker(
            sim.state.model,
            sim.base_url,
            window_size=2,
            step=1,
            context_window=400,
            on_error="skip",
        ) as reranker:
            rankings = reranker.rerank_batch([bad, good])
        with Reranker(
            sim.state.model, sim.base_url, window_size=2, step=1, context_window=400
        ) as strict:
            with pytest.raises(Exception, match="query long failed: a window of 2 passages"):
                strict.rerank_batch([bad])
    assert rankings[0].error is not None and "does not fit a context" in rankings[0].error
    assert rankings[0].usage.failed_queries == 1 and rankings[0].usage.failed_calls == 1
    assert rankings[0].docids == [c.docid for c in good.candidates]  # input order
    assert rankings[1].error is None and rankings[1].usage.calls == 3


def test_a_failed_querys_ranking_carries_what_it_spent():
    faults = NoLogprobsFor(QIDS[0])
    requests = list(read_requests(CANDIDATES))[:2]
    for r in requests:
        r.candidates = r.candidates[:5]
    with simulator(faults=faults) as sim:
        with Reranker(
            sim.state.model, sim.base_url, method="pointwise", concurrency=1, on_error="skip"
        ) as reranker:
            failed, good = reranker.rerank_batch(requests)
    assert failed.error is not None and good.error is None
    usage = failed.usage
    assert usage.failed_queries == 1 and usage.calls >= 1
    # Exactly the answers it was given: 50 prompt tokens and 1 completion token each.
    assert (usage.prompt_tokens, usage.completion_tokens) == (50 * usage.calls, usage.calls)
    assert good.usage.calls == 5 and good.usage.failed_queries == 0
