"""Strategies against the simulator: quality, calls, rounds, tokens and wall time, side by side.

For each data set and noise model a simulator is started in its own process (so its work does
not share our interpreter), answering every request after ``--latency`` seconds (0.2 by
default). Each strategy reranks every query of the data set through it at the same
``--concurrency``. Reported per strategy: nDCG@10, calls / sequential rounds / prompt tokens per
query, wall time, and the ratios of rounds, tokens and wall time to ``sliding`` measured in the
same run under the same noise and seed.

    PYTHONPATH=. python bench/bench_strategies.py                       # DL19 + DL20, all noises
    PYTHONPATH=. python bench/bench_strategies.py --data dl19 --noise none --markdown out.md

Not a test: pytest does not collect bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PERMRANK_DATA", ROOT.parent / "shared" / "data"))

NOISES = {
    "none": "0",
    "swap": "swap:0.1",
    "bias": "bias:1.0",
    "miss": "miss:0.05",
    "attention": "attention:10",
}
"""Noise models by name: the spec each is run with (see ``permrank.sim.noise``)."""

STRATEGY_RUNS: dict[str, dict[str, Any]] = {
    "sliding": {"strategy": "sliding", "window_size": 20, "step": 10},
    "tournament": {"strategy": "tournament", "window_size": 20, "top_n": 10},
    "tdpart": {"strategy": "tdpart", "window_size": 20, "top_n": 10},
    "tdpart+sc3": {
        "strategy": "selfconsistency",
        "window_size": 20,
        "top_n": 10,
        "strategy_options": {"inner": "tdpart", "shuffles": 3},
    },
}
"""What each row of the table runs, as ``Reranker`` keyword arguments."""


@dataclass
class Row:
    data: str
    noise: str
    method: str
    ndcg10: float
    queries: int
    calls: float
    rounds: float
    max_rounds: int
    prompt_tokens: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class SimulatorProcess:
    """``permrank simulate`` in a child process on a free loopback port."""

    def __init__(self, data: Path, noise: str, latency: float, seed: int = 0):
        cmd = [
            sys.executable,
            "-m",
            "permrank",
            "simulate",
            "--data",
            str(data),
            "--port",
            "0",
            "--latency",
            str(latency),
            "--noise",
            noise,
            "--seed",
            str(seed),
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base_url = line.split()[2]
        self._warm_up()

    def _warm_up(self) -> None:
        """One request before any timing, so the simulator's tokenizer is loaded."""
        body = json.dumps({"model": "warm-up", "messages": [{"role": "user", "content": "hi"}]})
        request = Request(
            self.base_url + "/chat/completions",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        urlopen(request, timeout=60).read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(data: Path) -> tuple[list[Any], dict[str, dict[str, int]]]:
    from permrank.runs.evaluate import read_qrels
    from permrank.runs.io import read_requests

    path = next(p for p in (data / "candidates.jsonl", data / "candidates.jsonl.gz") if p.exists())
    return list(read_requests(path)), read_qrels(data / "qrels.txt")


def ndcg10(rankings: list[Any], qrels: dict[str, dict[str, int]]) -> float:
    from permrank.runs.evaluate import evaluate, run_of

    return evaluate(run_of(rankings), qrels, ["nDCG@10"])["nDCG@10"]


def run_permrank(
    base_url: str, requests: list[Any], options: dict[str, Any], concurrency: int
) -> tuple[list[Any], float]:
    """Rerank ``requests`` through ``base_url``; the Rankings and the wall time."""
    from permrank.engine.reranker import Reranker

    async def go() -> tuple[list[Any], float]:
        started = time.perf_counter()  # cold, as a user runs it: tokenizer and client included
        reranker = Reranker(
            model="simulator", base_url=base_url, concurrency=concurrency, **options
        )
        try:
            rankings = await reranker.arerank_batch([r.model_copy() for r in requests])
            return rankings, time.perf_counter() - started
        finally:
            await reranker.aclose()

    return asyncio.run(go())


def row_of(
    data: str, noise: str, method: str, rankings: list[Any], qrels: Any, seconds: float
) -> Row:
    n = len(rankings)
    return Row(
        data=data,
        noise=noise,
        method=method,
        ndcg10=ndcg10(rankings, qrels),
        queries=n,
        calls=sum(r.usage.calls for r in rankings) / n,
        rounds=sum(r.usage.rounds for r in rankings) / n,
        max_rounds=max(r.usage.rounds for r in rankings),
        prompt_tokens=sum(r.usage.prompt_tokens for r in rankings) / n,
        seconds=seconds,
    )


def table(rows: list[Row], baseline: str = "sliding") -> str:
    """A markdown table; ratios are against ``baseline`` of the same data set and noise."""
    base = {(r.data, r.noise): r for r in rows if r.method == baseline}
    lines = [
        "| data | noise | strategy | nDCG@10 | Δ vs sliding | calls/q | rounds/q (max) "
        "| prompt tok/q | tokens vs sliding | wall s | wall vs sliding |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get((r.data, r.noise))
        delta = f"{r.ndcg10 - b.ndcg10:+.4f}" if b else "—"
        tok = f"{r.prompt_tokens / b.prompt_tokens:.2f}x" if b else "—"
        wall = f"{r.seconds / b.seconds:.2f}x" if b else "—"
        lines.append(
            f"| {r.data} | {r.noise} | {r.method} | {r.ndcg10:.4f} | {delta} | {r.calls:.1f} "
            f"| {r.rounds:.2f} ({r.max_rounds}) | {r.prompt_tokens:,.0f} | {tok} "
            f"| {r.seconds:.1f} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["trec-dl19", "trec-dl20"])
    parser.add_argument("--noise", nargs="+", default=list(NOISES), choices=list(NOISES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_RUNS))
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request (0.2)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    parser.add_argument("--limit", type=int, default=None, help="first N queries only")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for name in args.data:
        folder = DATA / name if not Path(name).is_dir() else Path(name)
        requests, qrels = load(folder)
        requests = requests[: args.limit]
        qrels = {r.query.qid: qrels[r.query.qid] for r in requests if r.query.qid in qrels}
        print(f"{folder.name}: {len(requests)} queries", file=sys.stderr)
        for noise in args.noise:
            with SimulatorProcess(folder, NOISES[noise], args.latency, args.seed) as sim:
                for method in args.strategies:
                    rankings, seconds = run_permrank(
                        sim.base_url, requests, STRATEGY_RUNS[method], args.concurrency
                    )
                    row = row_of(folder.name, noise, method, rankings, qrels, seconds)
                    rows.append(row)
                    print(
                        f"  {noise:9} {method:12} nDCG@10 {row.ndcg10:.4f} rounds "
                        f"{row.rounds:.2f} tokens {row.prompt_tokens:,.0f} {seconds:.1f} s",
                        file=sys.stderr,
                    )
    text = table(rows)
    print(
        f"latency {args.latency * 1000:.0f} ms per request, concurrency {args.concurrency}, "
        f"noise seed {args.seed}\n"
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
