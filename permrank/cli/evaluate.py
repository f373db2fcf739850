"""``permrank eval``: metrics of runs against qrels (ir-measures)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate runs (TREC run files or permrank JSONL) against qrels",
        description="Evaluate with ir-measures. Metrics compose as in ir-measures: nDCG@10, "
        "P(rel=2)@10, AP(rel=2), R(rel=2)@100, RR@10 ...",
    )
    p.add_argument(
        "--run",
        required=True,
        action="append",
        help="TREC run or permrank JSONL (repeat to compare several)",
    )
    p.add_argument("--qrels", required=True, help="TREC qrels file")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics (default nDCG@10)")
    p.add_argument("--per-query", action="store_true", help="also print each query's value")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from permrank.runs.evaluate import (
        DEFAULT_METRICS,
        evaluate,
        parse_metrics,
        per_query,
        read_qrels,
        read_run,
    )

    args.metrics = args.metrics or list(DEFAULT_METRICS)
    parse_metrics(args.metrics)  # refuse a bad metric name before reading anything
    qrels = read_qrels(args.qrels)
    width = max(len(r) for r in args.run)
    print("run".ljust(width) + "".join(f"  {m:>12}" for m in args.metrics))
    for path in args.run:
        run_ = read_run(path)
        values = evaluate(run_, qrels, args.metrics)
        print(path.ljust(width) + "".join(f"  {values[m]:>12.4f}" for m in values))
        if args.per_query:
            for metric in args.metrics:
                for qid, value in sorted(per_query(run_, qrels, metric).items()):
                    print(f"  {qid}\t{metric}\t{value:.4f}")
    return 0
