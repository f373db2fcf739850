"""tdpart against the sliding window under a noisy judge, in process (no server, seconds).

The judge is ``permrank.sim.noise.judge_order`` over each shown passage's qrels grade (unjudged:
0), seeded per noise seed and window, exactly as the simulator answers. For each collection
(BM25 top-100), each noise seed and each strategy, the plan is driven to the end and the
final order scored with nDCG@10; reported: the mean over seeds, the rounds, and the passages
shown per query (the prompt tokens are proportional to them: one passage cut to the same
budget each, plus a fixed instruction per window, counted as ``--window-overhead`` passages).

    PYTHONPATH=. python bench/bench_tdpart_noise.py --swap 0.3 --seeds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from permrank.core.strategies import get_strategy  # noqa: E402
from permrank.core.strategies.base import run_plan  # noqa: E402
from permrank.runs.evaluate import per_query, read_qrels  # noqa: E402
from permrank.runs.io import read_requests  # noqa: E402
from permrank.sim.noise import Noise, judge_order  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def run(strategy, queries, qrels, noise: Noise, overhead: float):
    runs, rounds, shown = {}, [], []
    for qid, docids in queries.items():
        grades = [qrels.get(qid, {}).get(d, 0) for d in docids]
        seen = [0]

        def judge(
            window: list[int], qid: str = qid, grades: list[int] = grades, seen: list = seen
        ) -> list[int]:
            seen[0] += len(window) + overhead
            key = f"{qid}:{','.join(map(str, window))}"
            answer = judge_order([grades[i] for i in window], noise, key)
            return [window[p] for p in answer]

        order, r = run_plan(strategy.plan(len(docids)), judge)
        runs[qid] = {docids[i]: float(len(order) - rank) for rank, i in enumerate(order)}
        rounds.append(r)
        shown.append(seen[0])
    scores = per_query(runs, qrels, "nDCG@10")
    return statistics.mean(scores.values()), statistics.mean(rounds), statistics.mean(shown)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--swap", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--collections", default="trec-dl19,trec-dl20")
    p.add_argument("--window-overhead", type=float, default=2.0)
    p.add_argument("--tdpart", default="", help="tdpart options, e.g. fill_final=False")
    args = p.parse_args()
    options = {}
    for item in filter(None, args.tdpart.split(",")):
        key, value = item.split("=")
        options[key] = {"True": True, "False": False}.get(value, value)
        if isinstance(options[key], str) and options[key].isdigit():
            options[key] = int(options[key])
    strategies = {
        "sliding": get_strategy("sliding", window_size=20, step=10),
        "tdpart": get_strategy("tdpart", **{"window_size": 20, "top_n": 10, **options}),
    }
    print(f"swap {args.swap}, {args.seeds} seeds, tdpart options {options or 'default'}")
    print("| collection | strategy | nDCG@10 (mean of seeds) | rounds/q | passages shown/q |")
    print("|---|---|---|---|---|")
    for name in args.collections.split(","):
        folder = DATA / name
        qrels = read_qrels(folder / "qrels.txt")
        queries = {
            r.query.qid: [c.docid for c in r.candidates[:100]]
            for r in read_requests(folder / "candidates.jsonl")
            if r.query.qid in qrels
        }
        results = {}
        for label, strategy in strategies.items():
            per_seed = [
                run(strategy, queries, qrels, Noise(swap=args.swap, seed=s), args.window_overhead)
                for s in range(args.seeds)
            ]
            results[label] = tuple(statistics.mean(x) for x in zip(*per_seed, strict=True))
            ndcg, rounds, shown = results[label]
            print(f"| {name} | {label} | {ndcg:.4f} | {rounds:.2f} | {shown:.1f} |")
        gap = results["tdpart"][0] - results["sliding"][0]
        ratio = results["tdpart"][2] / results["sliding"][2]
        print(f"| {name} | tdpart - sliding | {gap:+.4f} | | x{ratio:.2f} shown |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
