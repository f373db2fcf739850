"""Rerank several queries at once from Python and measure nDCG@10 before and after.

    permrank simulate --data ../shared/data/trec-dl19 --port 8000 &
    python examples/batch.py http://127.0.0.1:8000/v1 ../shared/data/trec-dl19

The windows of all queries are in flight together (up to ``concurrency``), each query's windows
in its strategy's order. The data folder holds candidates.jsonl and qrels.txt.
"""

import json
import os
import sys
from itertools import islice
from pathlib import Path

import ir_measures
from ir_measures import nDCG

from permrank import Limits, Reranker, TopDownPartition

args = sys.argv[1:]
base_url = args[0] if args else os.environ.get("PERMRANK_BASE_URL", "http://127.0.0.1:8000/v1")
data = Path(args[1] if len(args) > 1 else "../shared/data/trec-dl19")

with open(data / "candidates.jsonl") as lines:
    # the first 5 queries, their BM25 top 100: {"qid", "query", "candidates": [{"docid", "text"}]}
    records = [json.loads(line) for line in islice(lines, 5)]

strategy, limits = TopDownPartition(top_n=10), Limits(concurrency=16)
with Reranker("permrank-simulator", base_url, strategy=strategy, limits=limits) as reranker:
    rankings = reranker.rerank_batch(records)  # also Requests, or (query, documents) pairs


def run_of(lists):  # {qid: {docid: score}}, higher is better
    return {qid: {d: float(len(ds) - i) for i, d in enumerate(ds)} for qid, ds in lists}


asked = {record["qid"] for record in records}
qrels = [q for q in ir_measures.read_trec_qrels(str(data / "qrels.txt")) if q.query_id in asked]
before = run_of((rec["qid"], [c["docid"] for c in rec["candidates"]]) for rec in records)
after = run_of((r.query.qid, r.docids) for r in rankings)
calls = sum(r.usage.calls for r in rankings)
rounds = max(r.usage.rounds for r in rankings)
print(f"{len(rankings)} queries, {calls} model calls, at most {rounds} rounds a query")
for name, run in (("first stage", before), ("reranked", after)):
    value = ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10]
    print(f"nDCG@10 {name:<11} {value:.4f}")
