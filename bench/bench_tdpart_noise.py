"""tdpart against the sliding window under a noisy judge, in process (no server, seconds).

The judge is ``permrank.sim.noise.judge_order`` over each shown passage's qrels grade (unjudged:
0), seeded per noise seed and window, exactly as the simulator answers. For each collection
(BM25 top-100), each noise seed and each strategy, the plan is driven to the end and the
final order scored with nDCG@10; reported: the mean over seeds, the rounds, the passages
shown per query (plus a fixed instruction per window, counted as ``--window-overhead``
passages), and the real prompt tokens per query over the first ``--token-seeds`` seeds: each
window rendered as a run renders it (the ``rankgpt`` template, passages cut to 300 tokens) and
counted as the simulator counts it.

    PYTHONPATH=. python bench/bench_tdpart_noise.py --swap 0.3 --seeds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from permrank.core.prompts import count_message_tokens, load_template, render_window  # noqa: E402
from permrank.core.strategies import get_strategy  # noqa: E402
from permrank.core.strategies.base import run_plan  # noqa: E402
from permrank.engine.pipeline import memo_tokenizer  # noqa: E402
from permrank.runs.evaluate import per_query, read_qrels  # noqa: E402
from permrank.runs.io import read_requests  # noqa: E402
from permrank.sim.noise import Noise, judge_order  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def prompt_tokens(template, tokenizer, query: str, passages: list) -> int:
    """A window's prompt tokens as the simulator counts them (4 more a message)."""
    messages = render_window(template, query, passages, tokenizer=tokenizer)
    return count_message_tokens(messages, tokenizer)


def run(strategy, requests, qrels, noise: Noise, overhead: float, count=None):
    """nDCG@10, rounds, passages shown and (with ``count``, a window's prompt tokens) tokens,
    each the mean over queries."""
    runs, rounds, shown, tokens = {}, [], [], []
    for request in requests:
        qid, docids = request.query.qid, [c.docid for c in request.candidates]
        grades = [qrels.get(qid, {}).get(d, 0) for d in docids]
        seen = [0.0, 0]

        def judge(
            window: list[int], qid: str = qid, grades: list = grades, seen: list = seen, r=request
        ) -> list[int]:
            seen[0] += len(window) + overhead
            if count is not None:
                seen[1] += count(r, window)
            key = f"{qid}:{','.join(map(str, window))}"
            answer = judge_order([grades[i] for i in window], noise, key)
            return [window[p] for p in answer]

        order, r = run_plan(strategy.plan(len(docids)), judge)
        runs[qid] = {docids[i]: float(len(order) - rank) for rank, i in enumerate(order)}
        rounds.append(r)
        shown.append(seen[0])
        tokens.append(seen[1])
    scores = per_query(runs, qrels, "nDCG@10")
    return (
        statistics.mean(scores.values()),
        statistics.mean(rounds),
        statistics.mean(shown),
        statistics.mean(tokens),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--swap", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--collections", default="trec-dl19,trec-dl20")
    p.add_argument("--window-overhead", type=float, default=2.0)
    p.add_argument("--tdpart", default="", help="tdpart options, e.g. guard=False")
    p.add_argument(
        "--token-seeds", type=int, default=5, help="seeds whose prompt tokens are counted (5)"
    )
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
    template, tokenizer = load_template("rankgpt"), memo_tokenizer()

    def count(request, window: list[int]) -> int:
        passages = [(request.candidates[i].text, request.candidates[i].title) for i in window]
        return prompt_tokens(template, tokenizer, request.query.text, passages)

    token_seeds = min(args.token_seeds, args.seeds)
    print(f"swap {args.swap}, {args.seeds} seeds, tdpart options {options or 'default'}")
    print(
        "| collection | strategy | nDCG@10 (mean of seeds) | rounds/q | passages shown/q "
        f"| prompt tokens/q ({token_seeds} seeds) |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.collections.split(","):
        folder = DATA / name
        qrels = read_qrels(folder / "qrels.txt")
        requests = []
        for request in read_requests(folder / "candidates.jsonl"):
            if request.query.qid in qrels:
                request.candidates[:] = request.candidates[:100]
                requests.append(request)
        results = {}
        for label, strategy in strategies.items():
            per_seed = [
                run(
                    strategy,
                    requests,
                    qrels,
                    Noise(swap=args.swap, seed=s),
                    args.window_overhead,
                    count if s < token_seeds else None,
                )
                for s in range(args.seeds)
            ]
            ndcg, rounds, shown = (statistics.mean(x[i] for x in per_seed) for i in range(3))
            tokens = sum(x[3] for x in per_seed[:token_seeds]) / max(1, token_seeds)
            results[label] = (ndcg, rounds, shown, tokens)
            print(f"| {name} | {label} | {ndcg:.4f} | {rounds:.2f} | {shown:.1f} | {tokens:,.0f} |")
        gap = results["tdpart"][0] - results["sliding"][0]
        ratio = results["tdpart"][2] / results["sliding"][2]
        token_ratio = results["tdpart"][3] / results["sliding"][3] if token_seeds else float("nan")
        print(
            f"| {name} | tdpart - sliding | {gap:+.4f} | | x{ratio:.3f} shown "
            f"| x{token_ratio:.3f} tokens |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
