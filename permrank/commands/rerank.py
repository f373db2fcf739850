"""``permrank rerank``: rerank a JSONL file of queries and candidates."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import ConfigError
from ..evaluate import evaluate, read_qrels, run_of
from ..io import (
    open_text,
    ranking_line,
    read_requests,
    trec_lines,
    validate_requests,
    write_json_atomic,
)
from ..manifest import build_manifest, now
from ..rerank import Reranker
from ..strategies import STRATEGIES
from ..types import Ranking, Request, Usage


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that say which model answers and how it is asked (shared by commands)."""
    g = parser.add_argument_group("model")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="model name the endpoint serves")
    g.add_argument(
        "--backend",
        choices=("openai", "vllm"),
        default="openai",
        help="openai: an OpenAI-compatible endpoint (default); vllm: vLLM in this process, "
        "--model being a Hugging Face model folder (default: the converted SmolLM2), every "
        "window of a round in one generate call (needs the vllm extra)",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY); "
        "the key is never logged or written",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed sent with every request")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="answer budget per window (default: sized to a full permutation)",
    )
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    g.add_argument("--rps", type=float, default=None, help="requests per second at most")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    g.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="retries of a failed request (429, 5xx, timeouts) before giving up (5)",
    )

    g = parser.add_argument_group("windows and prompts")
    g.add_argument(
        "--strategy",
        default="sliding",
        choices=sorted(STRATEGIES),
        help="how windows are planned and merged (sliding)",
    )
    g.add_argument("--window-size", type=int, default=20, help="passages per window (20)")
    g.add_argument("--step", type=int, default=10, help="how far the window moves (10)")
    g.add_argument("--passes", type=int, default=1, help="sliding passes (1)")
    g.add_argument(
        "--top-k", type=int, default=None, help="rerank only the first K candidates (default: all)"
    )
    g.add_argument(
        "--prompt",
        default="rankgpt",
        help="template: rankgpt, rankzephyr, or a path to a TOML template",
    )
    g.add_argument(
        "--max-passage-tokens",
        type=int,
        default=300,
        help="each passage is cut to this many tokens (300)",
    )
    g.add_argument(
        "--context-window",
        type=int,
        default=8192,
        help="the model's context in tokens; prompts are fitted to it (8192)",
    )


def reranker_from_args(args: argparse.Namespace, **overrides: Any) -> Reranker:
    if getattr(args, "backend", "openai") == "vllm":
        overrides.setdefault("backend", "vllm")
    elif not args.base_url or not args.model:
        raise ConfigError(
            "give --base-url and --model of an OpenAI-compatible endpoint "
            "(a vLLM server, llama.cpp's server, OpenAI), or start one with "
            "`permrank simulate --data DIR` to try permrank without a model"
        )
    options: dict[str, Any] = dict(
        model=args.model,
        base_url=args.base_url,
        strategy=args.strategy,
        window_size=args.window_size,
        step=args.step,
        passes=args.passes,
        top_k=args.top_k,
        prompt=args.prompt,
        temperature=args.temperature,
        seed=args.seed,
        max_tokens=args.max_tokens,
        max_passage_tokens=args.max_passage_tokens,
        context_window=args.context_window,
        concurrency=args.concurrency,
        rps=args.rps,
        api_key_env=args.api_key_env,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
    )
    options.update(overrides)
    return Reranker(**options)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rerank",
        help="rerank a JSONL file of queries and candidates",
        description="Rerank first-stage candidates with an LLM. Input: JSONL, one query a line, "
        'ours ({"qid","query","candidates":[{"docid","text",...}]}) or rank_llm\'s Request '
        "layout, plain or .gz. Output: the same layout in the new order, a TREC run (--trec), "
        "and a run manifest (OUTPUT.manifest.json).",
    )
    p.add_argument("--input", required=True, help="JSONL (or .jsonl.gz) of queries + candidates")
    p.add_argument("--output", required=True, help="reranked JSONL (same layout as the input)")
    p.add_argument("--trec", help="also write a TREC run file here")
    p.add_argument("--manifest", help="run manifest path (default: OUTPUT.manifest.json)")
    p.add_argument("--qrels", help="TREC qrels: print nDCG@10 before and after")
    p.add_argument("--limit", type=int, default=None, help="rerank only the first N queries")
    p.add_argument(
        "--depth", type=int, default=None, help="keep only the first N candidates of each query"
    )
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a query that fails after retries stops the run (fail, default) or is "
        "written in its input order with the reason (skip)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    add_model_options(p)
    p.set_defaults(func=run)


def limited(requests: Iterator[Request], limit: int | None, depth: int | None) -> Iterator[Request]:
    for request in itertools.islice(requests, limit):
        if depth is not None:
            request.candidates = request.candidates[:depth]
        yield request


def summary_lines(totals: Usage, queries: int, seconds: float) -> list[str]:
    repairs = ", ".join(f"{k} {v}" for k, v in totals.repairs.items() if v)
    return [
        f"{queries} queries in {seconds:.1f} s: {totals.calls} calls "
        f"({totals.cached_calls} from cache), "
        f"{totals.rounds / max(1, queries):.1f} sequential rounds per query",
        f"tokens: {totals.prompt_tokens} prompt + {totals.completion_tokens} completion "
        f"= {totals.total_tokens}",
        f"window answers: {repairs or 'none'}",
    ]


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1 (got {args.limit})")
    if args.depth is not None and args.depth < 1:
        raise ConfigError(f"--depth must be at least 1 (got {args.depth})")
    # Everything that can be refused is refused before the first model call.
    n_queries, _ = validate_requests(args.input)
    if args.limit is not None:
        n_queries = min(n_queries, args.limit)
    qrels = read_qrels(args.qrels) if args.qrels else None
    reranker = reranker_from_args(args, on_error=args.on_error)
    started, t0 = now(), time.perf_counter()
    rankings: list[Ranking] = []
    totals = Usage()
    failed: dict[str, str] = {}
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    trec = open(args.trec, "w", encoding="utf-8") if args.trec else None
    done = 0
    try:
        with open_text(out_path, "w") as out:
            bar = tqdm(
                total=n_queries, unit="query", disable=args.quiet, file=sys.stderr, desc="rerank"
            )

            async def go() -> None:
                nonlocal done
                try:
                    requests = limited(read_requests(args.input), args.limit, args.depth)
                    async for ranking in reranker.astream(requests):
                        out.write(ranking_line(ranking))
                        out.flush()
                        if trec:
                            trec.write(trec_lines(ranking))
                        totals.add(ranking.usage)
                        if ranking.error:
                            failed[ranking.query.qid] = ranking.error
                        if qrels is not None:
                            rankings.append(ranking.model_copy(update={"trace": []}))
                        done += 1
                        bar.update(1)
                        bar.set_postfix(calls=totals.calls, tokens=totals.total_tokens)
                finally:
                    await reranker.aclose()

            try:
                asyncio.run(go())
            finally:
                bar.close()
    finally:
        if trec:
            trec.close()
        seconds = time.perf_counter() - t0
        manifest = build_manifest(
            command="rerank",
            parameters=reranker.manifest(),
            totals=totals,
            queries=done,
            failed=failed,
            started=started,
            seconds=seconds,
            files={
                "input": args.input,
                "output": args.output,
                "trec": args.trec,
                "limit": args.limit,
                "depth": args.depth,
            },
        )
        write_json_atomic(args.manifest or f"{args.output}.manifest.json", manifest)
    if not args.quiet:
        for line in summary_lines(totals, done, seconds):
            print(line)
        if qrels is not None:
            before_requests = limited(read_requests(args.input), args.limit, args.depth)
            before = evaluate(run_of_requests(before_requests), qrels, ["nDCG@10"])
            after = evaluate(run_of(rankings), qrels, ["nDCG@10"])
            print(f"nDCG@10: {before['nDCG@10']:.4f} before -> {after['nDCG@10']:.4f} after")
        if failed:
            print(f"{len(failed)} queries failed (input order kept): {', '.join(failed)}")
    return 1 if failed else 0


def run_of_requests(requests: Iterator[Request]) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for r in requests:
        n = len(r.candidates)
        run[r.query.qid] = {c.docid: float(n - i) for i, c in enumerate(r.candidates)}
    return run
