"""Engine overhead: what permrank itself costs per window, with a judge that costs nothing.

A ``Backend`` written in Python answers in-process from the qrels (no HTTP, no latency): it
finds the passages of each rendered prompt by their text, as the simulator does, and orders
them by grade. The time the judge takes is measured and taken out, so what is left is the
engine: rendering (templates, token budgets), parsing, the strategy and the driver. Reported:
windows per second of the engine, engine milliseconds per window and per query, and the share of
a query's time spent outside the model when every request takes ``--latency`` seconds (0.2)
and the windows of one round are sent together:

    share = engine time per query / (engine time per query + rounds per query x latency)

    PYTHONPATH=. python bench/bench_engine.py
    PYTHONPATH=. python bench/bench_engine.py --data trec-dl20 --strategies tdpart --limit 10

Not a test: pytest does not collect bench/.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_strategies import DATA, STRATEGY_RUNS, load  # noqa: E402

from permrank.core.types import Completion
from permrank.sim.noise import Noise, judge_order
from permrank.sim.state import Corpus, find_passages, prompt_text


class QrelsBackend:
    """Answers windows in-process from the qrels; counts the time it spends judging."""

    model = "qrels-in-process"
    endpoint = "in-process"

    def __init__(self, corpus: Corpus, noise: Noise | None = None):
        self.corpus = corpus
        self.noise = noise or Noise()
        self.judge_seconds = 0.0
        self.calls = 0

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        started = time.perf_counter()
        prompt = " ".join(prompt_text({"messages": messages}).split())
        query = self.corpus.find_query(prompt)
        if query is None:
            text = "no query found"
        else:
            shown = find_passages(prompt, query)
            grades = [query.passages[i][2] for i in shown]
            key = hashlib.sha256(prompt.encode()).hexdigest()
            text = " > ".join(f"[{i + 1}]" for i in judge_order(grades, self.noise, key))
        self.calls += 1
        self.judge_seconds += time.perf_counter() - started
        return Completion(text=text, prompt_tokens=0, completion_tokens=0)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "endpoint": self.endpoint}

    async def aclose(self) -> None:
        return None


def measure(requests: list[Any], corpus: Corpus, options: dict[str, Any]) -> dict[str, float]:
    """Rerank every query one after another (no overlap) and split judge and engine time."""
    from permrank.engine.reranker import Reranker

    backend = QrelsBackend(corpus)
    reranker = Reranker(backend=backend, **options)

    async def go() -> tuple[float, int]:
        started = time.perf_counter()
        rounds = 0
        for request in requests:
            ranking = await reranker.arank(
                request.query.text, request.candidates, qid=request.query.qid
            )
            rounds += ranking.usage.rounds
        return time.perf_counter() - started, rounds

    reranker.rank("warm up", ["a", "b"])  # tokenizer and template loaded before timing
    backend.judge_seconds, backend.calls = 0.0, 0
    seconds, rounds = reranker._sync(go())
    reranker.close()
    engine = seconds - backend.judge_seconds
    return {
        "queries": len(requests),
        "windows": backend.calls,
        "rounds": rounds,
        "engine_s": engine,
        "judge_s": backend.judge_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="trec-dl19")
    parser.add_argument("--strategies", nargs="+", default=["sliding", "tournament", "tdpart"])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request (0.2)")
    parser.add_argument("--limit", type=int, default=None, help="first N queries only")
    args = parser.parse_args(argv)
    folder = Path(args.data) if Path(args.data).is_dir() else DATA / args.data
    requests, _ = load(folder)
    requests = requests[: args.limit]
    corpus = Corpus.from_dir(folder)
    print(
        f"{folder.name}, {len(requests)} queries, in-process qrels judge; "
        f"share at {args.latency * 1000:.0f} ms per request\n"
    )
    print(
        "| strategy | windows/s (engine) | engine ms/window | engine ms/query | rounds/query "
        "| share outside the model |"
    )
    print("|---|---|---|---|---|---|")
    for method in args.strategies:
        m = measure(requests, corpus, STRATEGY_RUNS[method])
        per_query = m["engine_s"] / m["queries"]
        model = m["rounds"] / m["queries"] * args.latency
        print(
            f"| {method} | {m['windows'] / m['engine_s']:,.0f} "
            f"| {1000 * m['engine_s'] / m['windows']:.2f} | {1000 * per_query:.1f} "
            f"| {m['rounds'] / m['queries']:.2f} | {100 * per_query / (per_query + model):.1f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
