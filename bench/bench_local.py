"""llama.cpp on this CPU: what a permrank run gets out of the server, and what slots add.

1. permrank vs the server alone, on the same prompts: a permrank run (embedded llama-server,
   one slot, prompt cache off) records every request it sends; the same requests are then sent
   straight to the server with httpx, one after the other. Reported: prompt and generated tokens
   per second as the server timed them, and end-to-end tokens per second (wall clock), permrank
   as a ratio of the server alone (goal: >= 0.90). The two alternate ``--repeats`` times (the
   machine is shared) and the best of each is compared. On a loaded machine those rates swing;
   the share of wall time the server spends computing (its own timings over the wall clock) does
   not depend on the load, and its ratio is what permrank costs.
2. Several windows at once: the same queries reranked with ``-np N`` slots and N requests in
   flight, windows per second as a ratio of one slot.

    PYTHONPATH=. python bench/bench_local.py [--queries 4] [--depth 10] [--slots 1 2 4]

Not a test: it prints figures (and the load average, which matters on a shared machine).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from permrank import Reranker
from permrank.backends.openai import OpenAIBackend
from permrank.backends.probe import probe
from permrank.core.types import Completion, Request
from permrank.runs.io import read_requests
from permrank.servers.llamacpp import LlamaServer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "trec-dl19" / "candidates.jsonl"
NO_PROMPT_CACHE = {"cache_prompt": False}  # every run pays for its whole prompt


@dataclass
class Tally:
    """Tokens and times of one run."""

    wall_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    windows: int = 0

    def add(self, answer: dict[str, Any]) -> None:
        usage, timings = answer.get("usage") or {}, answer.get("timings") or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.prompt_ms += float(timings.get("prompt_ms") or 0.0)
        self.predicted_ms += float(timings.get("predicted_ms") or 0.0)
        self.windows += 1

    @property
    def prompt_per_s(self) -> float:
        return 1000 * self.prompt_tokens / self.prompt_ms if self.prompt_ms else 0.0

    @property
    def generated_per_s(self) -> float:
        return 1000 * self.completion_tokens / self.predicted_ms if self.predicted_ms else 0.0

    @property
    def busy(self) -> float:
        """The share of the wall time the server spent computing (not waiting for the client)."""
        return (self.prompt_ms + self.predicted_ms) / 1000 / self.wall_s if self.wall_s else 0.0

    @property
    def end_to_end_per_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.wall_s if self.wall_s else 0.0


@dataclass
class Recording:
    """A backend that remembers every request body and answer (to replay them)."""

    inner: OpenAIBackend
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def endpoint(self) -> str:
        return self.inner.endpoint

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.inner.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            **(extra or {}),
        }
        if seed is not None:
            body["seed"] = seed
        completion = await self.inner.complete(
            messages, max_tokens=max_tokens, temperature=temperature, seed=seed, extra=extra
        )
        self.requests.append(body)
        self.answers.append(completion.raw or {})
        return completion

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def aclose(self) -> None:
        await self.inner.aclose()


def permrank_run(
    server: LlamaServer, requests: list[Request], args: argparse.Namespace, concurrency: int
) -> tuple[Tally, list[dict[str, Any]]]:
    info = probe(server.base_url)
    backend = Recording(
        OpenAIBackend(server.base_url, server.model, concurrency=concurrency, timeout_s=3600)
    )
    reranker = Reranker(
        backend=backend,
        window_size=args.depth,
        step=args.depth,
        max_passage_tokens=args.max_passage_tokens,
        context_window=info.context_window or server.ctx,
        tokenizer=info.tokenizer(),
        concurrency=concurrency,
        extra_body=NO_PROMPT_CACHE,
    )
    with reranker:
        started = time.perf_counter()
        reranker.rerank_batch(requests)
        tally = Tally(wall_s=time.perf_counter() - started)
    for answer in backend.answers:
        tally.add(answer)
    return tally, backend.requests


def server_alone(server: LlamaServer, bodies: list[dict[str, Any]]) -> Tally:
    tally = Tally()
    with httpx.Client(timeout=3600) as client:
        started = time.perf_counter()
        for body in bodies:
            response = client.post(f"{server.base_url}/chat/completions", json=body)
            response.raise_for_status()
            tally.add(response.json())
        tally.wall_s = time.perf_counter() - started
    return tally


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def describe(name: str, t: Tally) -> str:
    return (
        f"  {name:<13} {t.windows} windows in {t.wall_s:6.1f} s: prompt {t.prompt_per_s:6.1f} "
        f"tok/s, generated {t.generated_per_s:5.1f} tok/s (server timings); end to end "
        f"{t.end_to_end_per_s:6.1f} tok/s ({t.prompt_tokens} + {t.completion_tokens} tokens); "
        f"server busy {t.busy:.3f} of the wall time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="candidates.jsonl (DL19)")
    parser.add_argument("--queries", type=int, default=4, help="queries (one window each)")
    parser.add_argument("--depth", type=int, default=10, help="candidates per query = window")
    parser.add_argument("--max-passage-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternations of part 1")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="GGUF (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    requests = []
    for request in itertools.islice(read_requests(args.data), args.queries):
        request.candidates = request.candidates[: args.depth]
        requests.append(request)
    print(
        f"{len(requests)} DL19 queries x {args.depth} passages (one window each, passages cut "
        f"to {args.max_passage_tokens} tokens), llama.cpp -t {args.threads}, {os.cpu_count()} "
        f"CPUs, {load()}"
    )

    print("1. permrank vs the server alone on the same prompts (1 slot, prompt cache off)")
    ours: list[Tally] = []
    alone: list[Tally] = []
    with LlamaServer(args.model, threads=args.threads) as server:
        for _ in range(args.repeats):
            tally, bodies = permrank_run(server, requests, args, concurrency=1)
            ours.append(tally)
            print(describe("permrank", tally), flush=True)
            alone.append(server_alone(server, bodies))
            print(describe("server alone", alone[-1]), flush=True)
    best_ours = max(ours, key=lambda t: t.end_to_end_per_s)
    best_alone = max(alone, key=lambda t: t.end_to_end_per_s)
    for label, attr in (
        ("prompt tok/s", "prompt_per_s"),
        ("generated tok/s", "generated_per_s"),
        ("end-to-end tok/s", "end_to_end_per_s"),
    ):
        a, b = getattr(best_ours, attr), getattr(best_alone, attr)
        print(f"  {label:<17} permrank / server alone = {a:.1f} / {b:.1f} = {a / b:.3f}")
    ratios = [o.end_to_end_per_s / a.end_to_end_per_s for o, a in zip(ours, alone, strict=True)]
    print(f"  end-to-end ratio per alternation: {', '.join(f'{r:.3f}' for r in ratios)}")
    # The server's own timings do not depend on the client; what a client can lose is the time
    # the server waits between requests. Busy share = server compute time / wall time, so
    # permrank's share over the server-alone share is the load-independent ratio.
    busy_ours = statistics.median(t.busy for t in ours)
    busy_alone = statistics.median(t.busy for t in alone)
    print(
        f"  server busy share (median): permrank {busy_ours:.3f} / server alone {busy_alone:.3f}"
        f" = {busy_ours / busy_alone:.3f}"
    )

    print(f"2. several windows at once (-np N, N requests in flight), {load()}")
    base: float | None = None
    for slots in args.slots:
        with LlamaServer(args.model, threads=args.threads, parallel=slots) as server:
            tally, _ = permrank_run(server, requests, args, concurrency=slots)
        rate = tally.windows / tally.wall_s
        base = base or rate
        print(
            f"  -np {slots}: {tally.windows} windows in {tally.wall_s:6.1f} s = {rate:.3f} "
            f"windows/s, x{rate / base:.2f} vs -np {args.slots[0]}; end to end "
            f"{tally.end_to_end_per_s:.1f} tok/s",
            flush=True,
        )
    print(f"done, {load()}; median end-to-end ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
