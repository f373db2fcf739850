"""How much of vLLM's throughput a permrank run gets, and what batching and prefix caching give.

For each way of running vLLM (in this process with ``--backend vllm``; a server started with
``VllmServer`` and reached through the OpenAI backend) it measures:

- **permrank**: a rerank run (sliding windows) of a few DL19 queries; prompt and generated tokens
  per second of wall time, as counted by vLLM.
- **vLLM alone**: the very same prompts (recorded from that run), sent straight to vLLM round by
  round (every window of a round at once: one ``llm.chat`` call, or concurrent HTTP requests).
  permrank's share = permrank tok/s / alone tok/s (goal >= 90%).
- **one at a time**: the same prompts one window per call: the gain from batching.
- **no prefix cache** (in-process): a second engine without prefix caching on the same rounds.

Every figure is a ratio against a baseline measured in the same run. Run it with vLLM installed:

    PYTHONPATH=. /work/venv-vllm/bin/python bench/bench_vllm.py [--queries 3 --depth 20 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from permrank.backends.vllm_inprocess import HfTokenizer, VllmInProcessBackend
from permrank.core.types import Completion, Request
from permrank.engine.reranker import Reranker
from permrank.runs.io import read_requests
from permrank.servers.convert import default_model_dir
from permrank.servers.vllm import VllmServer

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Figure:
    name: str
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    calls: int

    @property
    def prompt_rate(self) -> float:
        return self.prompt_tokens / self.seconds

    @property
    def completion_rate(self) -> float:
        return self.completion_tokens / self.seconds


@dataclass
class Window:
    """One recorded window: its messages, answer budget, and the query's round it belongs to."""

    messages: list[dict[str, str]]
    max_tokens: int
    round: int


class Recorder:
    """Wraps a backend; records every window asked, with the round of its query."""

    def __init__(self, backend: Any, queries: list[str]):
        self.backend = backend
        self.model = backend.model
        self.endpoint = backend.endpoint
        self.queries = queries
        self.windows: list[Window] = []
        self._rounds: dict[str, int] = defaultdict(int)

    async def complete(self, messages: list[dict[str, str]], **options: Any) -> Completion:
        query = next(q for q in self.queries if any(q in m["content"] for m in messages))
        self.windows.append(Window(messages, options["max_tokens"], self._rounds[query]))
        self._rounds[query] += 1
        return await self.backend.complete(messages, **options)

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()

    async def aclose(self) -> None:
        pass

    def rounds(self) -> list[list[Window]]:
        by_round: dict[int, list[Window]] = defaultdict(list)
        for w in self.windows:
            by_round[w.round].append(w)
        return [by_round[r] for r in sorted(by_round)]


def load_requests(args: argparse.Namespace) -> list[Request]:
    requests = []
    for request in read_requests(str(args.input)):
        request.candidates = request.candidates[: args.depth]
        requests.append(request)
        if len(requests) == args.queries:
            break
    return requests


def permrank_run(name: str, backend: Any, requests: list[Request], args, tokenizer) -> tuple:
    recorder = Recorder(backend, [r.query.text for r in requests])
    reranker = Reranker(
        backend=recorder,
        window_size=args.window_size,
        step=args.step,
        max_passage_tokens=args.max_passage_tokens,
        context_window=args.max_model_len,
        concurrency=args.concurrency,
        tokenizer=tokenizer,
        max_tokens=args.max_tokens,
    )
    started = time.perf_counter()
    rankings = asyncio.run(reranker.arerank_batch(requests))
    seconds = time.perf_counter() - started
    figure = Figure(
        name,
        seconds,
        sum(r.usage.prompt_tokens for r in rankings),
        sum(r.usage.completion_tokens for r in rankings),
        sum(r.usage.calls for r in rankings),
    )
    return figure, recorder.rounds()


# -- vLLM in this process -------------------------------------------------------------------------
def chat_alone(llm: Any, name: str, rounds: list[list[Window]], per_call: int | None) -> Figure:
    """The recorded rounds straight through ``llm.chat``: ``per_call`` windows a call (all)."""
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    prompt = completion = calls = 0
    started = time.perf_counter()
    for windows in rounds:
        size = per_call or len(windows)
        for i in range(0, len(windows), size):
            chunk = windows[i : i + size]
            params = [SamplingParams(temperature=0, max_tokens=w.max_tokens) for w in chunk]
            outputs = llm.chat([w.messages for w in chunk], params, use_tqdm=False)
            calls += 1
            for out in outputs:
                prompt += len(out.prompt_token_ids)
                completion += len(out.outputs[0].token_ids)
    return Figure(name, time.perf_counter() - started, prompt, completion, calls)


def bench_inprocess(args, requests: list[Request], tokenizer) -> list[Figure]:
    engine = {"dtype": args.dtype} if args.dtype else {}
    backend = VllmInProcessBackend(
        args.model, max_model_len=args.max_model_len, engine_options=engine
    ).start()
    print(f"in-process engine loaded in {backend.load_s:.1f} s", flush=True)
    figures = []
    try:
        # A first pass warms the engine up (first forward passes are slower); not measured.
        permrank_run("warm-up", backend, requests, args, tokenizer)
        backend._llm.reset_prefix_cache()
        backend.batches.clear()
        run, rounds = permrank_run("permrank --backend vllm", backend, requests, args, tokenizer)
        run.calls = len(backend.batches)  # generate calls, as for the others
        figures.append(run)
        figures.append(chat_alone(backend._llm, "vLLM alone, a round per call", rounds, None))
        figures.append(chat_alone(backend._llm, "vLLM alone, one window per call", rounds, 1))
    finally:
        backend.shutdown()
    if args.no_prefix_check:
        engine["enable_prefix_caching"] = False
        plain = VllmInProcessBackend(
            args.model, max_model_len=args.max_model_len, engine_options=engine
        ).start()
        try:
            figures.append(
                chat_alone(
                    plain._llm, "vLLM alone, a round per call, no prefix cache", rounds, None
                )
            )
        finally:
            plain.shutdown()
    return figures


# -- a vLLM server --------------------------------------------------------------------------------
async def http_alone(
    base_url: str, model: str, name: str, rounds: list[list[Window]], concurrency: int
) -> Figure:
    """The recorded rounds straight to the server, ``concurrency`` requests in flight."""
    limit = asyncio.Semaphore(concurrency)
    prompt = completion = 0
    async with httpx.AsyncClient(timeout=None) as client:

        async def send(w: Window) -> None:
            nonlocal prompt, completion
            body = {
                "model": model,
                "messages": w.messages,
                "temperature": 0.0,
                "max_tokens": w.max_tokens,
            }
            async with limit:
                answer = (await client.post(f"{base_url}/chat/completions", json=body)).json()
            prompt += answer["usage"]["prompt_tokens"]
            completion += answer["usage"]["completion_tokens"]

        started = time.perf_counter()
        for windows in rounds:
            await asyncio.gather(*(send(w) for w in windows))
        seconds = time.perf_counter() - started
    return Figure(name, seconds, prompt, completion, sum(len(r) for r in rounds))


def bench_server(args, requests: list[Request], tokenizer) -> list[Figure]:
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache between runs
    extra = ["--dtype", args.dtype] if args.dtype else []
    with VllmServer(args.model, max_model_len=args.max_model_len, extra_args=extra) as server:
        print(f"server ready in {server.ready_s:.1f} s at {server.base_url}", flush=True)
        from permrank.backends.openai import OpenAIBackend

        def backend() -> OpenAIBackend:  # a client per event loop (asyncio.run)
            return OpenAIBackend(
                server.base_url, server.model, concurrency=args.concurrency, timeout_s=3600
            )

        permrank_run("warm-up", backend(), requests, args, tokenizer)
        with httpx.Client() as client:
            client.post(f"{server.url}/reset_prefix_cache").raise_for_status()
        run, rounds = permrank_run("permrank --base-url", backend(), requests, args, tokenizer)
        figures = [run]
        for name, concurrency in (
            ("server alone, a round at once", args.concurrency),
            ("server alone, one window at a time", 1),
        ):
            with httpx.Client() as client:  # the run before must not warm the cache for this one
                client.post(f"{server.url}/reset_prefix_cache").raise_for_status()
            figures.append(
                asyncio.run(http_alone(server.base_url, server.model, name, rounds, concurrency))
            )
    return figures


def report(title: str, figures: list[Figure], baseline: Figure) -> None:
    print(f"\n{title} (ratios against: {baseline.name})")
    print(f"{'':44} {'s':>7} {'calls':>5} {'prompt tok/s':>12} {'gen tok/s':>9} {'ratio':>6}")
    for f in figures:
        print(
            f"{f.name:44} {f.seconds:7.1f} {f.calls:5d} {f.prompt_rate:12.1f} "
            f"{f.completion_rate:9.1f} {f.prompt_rate / baseline.prompt_rate:6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()), help="HF model folder")
    parser.add_argument("--input", default=str(ROOT / "fixtures/dl19-5q/candidates.jsonl"))
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--window-size", type=int, default=10)
    parser.add_argument("--step", type=int, default=5)
    parser.add_argument("--max-passage-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=None, help="answer budget per window")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="vLLM --dtype (default: vLLM's choice)")
    parser.add_argument("--only", choices=("inprocess", "server"), default=None)
    parser.add_argument(
        "--no-prefix-check",
        action="store_true",
        help="also load an engine without prefix caching (in-process)",
    )
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    requests = load_requests(args)
    tokenizer = HfTokenizer(Path(args.model))
    print(
        f"{len(requests)} queries x {args.depth} candidates, windows of {args.window_size} "
        f"step {args.step}, passages <= {args.max_passage_tokens} tokens, model {args.model}"
    )
    results: dict[str, list[Figure]] = {}
    if args.only in (None, "inprocess"):
        figures = bench_inprocess(args, requests, tokenizer)
        results["inprocess"] = figures
        report("vLLM in process", figures, figures[1])
    if args.only in (None, "server"):
        figures = bench_server(args, requests, tokenizer)
        results["server"] = figures
        report("vLLM server", figures, figures[1])
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: [vars(f) for f in v] for k, v in results.items()}, indent=2)
        )


if __name__ == "__main__":
    main()
