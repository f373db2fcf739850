"""Fuse saved per-passage model scores with the first-stage score, offline (no model calls).

Reads ``bench_real.py``'s per-query rows (``OUT/MODEL/METHOD/COLLECTION.jsonl``: every
passage's score and the BM25 scores), and for each fusion weight ``w`` orders each query by
``w * minmax(model) + (1 - w) * minmax(first stage)`` (``permrank.engine.methods.likelihood.fuse``,
the code the methods run). The weight is chosen on one collection (``--pick``) and reported on
the other, never on the same; both with per-query wins/losses against BM25 and a paired t-test.

    PYTHONPATH=. python bench/fuse_offline.py --model qwen2.5-coder-0.5b --method likelihood
    PYTHONPATH=. python bench/fuse_offline.py --combine likelihood-chat,smollm2-135m:likelihood
    PYTHONPATH=. python bench/fuse_offline.py --method likelihood-chat+amx --split-by all

``--split-by FEATURE`` gives each query one of two weights: queries whose FEATURE is above its
median on the picking collection get one, the others the other, both picked there (a weight
that follows how sure the model or BM25 is of a query). Measured with the 0.5B recipe's AMX
rows, picked on DL20: DL19 0.5961-0.6024 over the six features, against 0.5984 for one weight
(0.8); picked on DL19 itself at most 0.6078. No feature is worth a rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_real import (  # noqa: E402
    COLLECTIONS,
    compare,
    done_rows,
    fused_orders,
    load_collection,
)

WEIGHTS = [round(0.05 * i, 2) for i in range(21)]


def report(collection: str, role: str, r: dict) -> None:
    print(
        f"{collection} ({role}, {r['queries']} queries): nDCG@10 {r['ndcg']:.4f} vs BM25 "
        f"{r['bm25']:.4f} ({r['ndcg'] - r['bm25']:+.4f}), {r['wins']} better / "
        f"{r['losses']} worse, paired t-test p = {r['p']:.3g}"
    )


def combined(rows_by_method: dict, weights: tuple[float, ...], ranks: bool) -> dict:
    """Order by ``w0 * first stage + sum(wi * method i)``, every signal min-max normalised."""
    from permrank.engine.methods.likelihood import min_max

    first_rows = next(iter(rows_by_method.values()))
    out = {}
    for qid, row in first_rows.items():
        docids = row["input"]
        signals = []
        if ranks or any(v is None for v in row["bm25"]):
            signals.append(min_max([-float(i) for i in range(len(docids))]))
        else:
            signals.append(min_max([float(v) for v in row["bm25"]]))
        missing = False
        for rows in rows_by_method.values():
            other = rows.get(qid)
            if other is None or any(d not in other["scores"] for d in docids):
                missing = True
                break
            signals.append(min_max([other["scores"][d] for d in docids]))
        if missing:
            continue
        fused = [
            sum(w * s[i] for w, s in zip(weights, signals, strict=True)) for i in range(len(docids))
        ]
        order = sorted(range(len(docids)), key=lambda i: (-fused[i], i))
        out[qid] = [docids[i] for i in order]
    return out


def simplex(parts: int, step: float = 0.1) -> list[tuple[float, ...]]:
    n = round(1 / step)
    if parts == 1:
        return [(1.0,)]
    out = []
    for i in range(n + 1):
        for rest in simplex(parts - 1, step):
            if abs(sum(rest) - 1) < 1e-9:
                out.append((round(i * step, 2), *[round(r * (1 - i * step), 4) for r in rest]))
    return out


def signal_path(args: argparse.Namespace, signal: str, collection: str) -> Path:
    """The rows of ``METHOD`` (of ``--model``) or of ``MODEL:METHOD`` (another model's)."""
    model, _, method = signal.rpartition(":")
    return args.out / (model or args.model) / method / f"{collection}.jsonl"


def main_combine(args: argparse.Namespace) -> int:
    methods = args.combine.split(",")
    other = next(c for c in COLLECTIONS if c != args.pick)
    data = {}
    for collection in COLLECTIONS:
        requests, qrels = load_collection(collection, 20, None)
        base = {r.query.qid: [c.docid for c in r.candidates] for r in requests}
        rows = {m: done_rows(signal_path(args, m, collection)) for m in methods}
        data[collection] = (rows, base, qrels)
    best = None
    for weights in simplex(len(methods) + 1):
        rows, base, qrels = data[args.pick]
        orders_ = combined(rows, weights, args.ranks)
        if not orders_:
            continue
        r = compare(orders_, base, qrels)
        if best is None or r["ndcg"] > best[1] + 1e-12:
            best = (weights, r["ndcg"])
    if best is None:
        return 1
    print(f"signals: first stage, {', '.join(methods)}; weights picked on {args.pick}: {best[0]}")
    for collection in (args.pick, other):
        rows, base, qrels = data[collection]
        orders_ = combined(rows, best[0], args.ranks)
        if not orders_:
            continue
        r = compare(orders_, base, qrels)
        report(collection, "picked on" if collection == args.pick else "tested on", r)
    return 0


def features(row: dict) -> dict[str, float]:
    """What a query's weight could follow: how spread the model's and BM25's scores are, and how
    much the two agree."""
    import statistics

    model = [float(row["scores"][d]) for d in row["input"]]
    bm25 = [float(v) for v in row["bm25"]]
    top = sorted(model, reverse=True)
    first = sorted(bm25, reverse=True)
    spread = first[0] - first[-1]
    agree = (
        statistics.correlation(model, bm25)
        if statistics.pstdev(model) > 0 and statistics.pstdev(bm25) > 0
        else 0.0
    )
    return {
        "model_spread": statistics.pstdev(model),
        "model_gap": top[0] - top[1],
        "bm25_gap": (first[0] - first[1]) / spread if spread else 0.0,
        "bm25_spread": spread,
        "bm25_top": first[0],
        "agreement": agree,
    }


def split_orders(rows: dict, above: set[str], high: float, low: float) -> dict:
    """Each query fused at ``high`` when its qid is in ``above``, else at ``low``."""
    at_high = {qid: row for qid, row in rows.items() if qid in above}
    at_low = {qid: row for qid, row in rows.items() if qid not in above}
    return {**fused_orders(at_high, high), **fused_orders(at_low, low)}


def main_split(args: argparse.Namespace, data: dict) -> int:
    import statistics

    other = next(c for c in COLLECTIONS if c != args.pick)
    feats = {c: {qid: features(row) for qid, row in data[c][0].items()} for c in COLLECTIONS}
    names = (
        list(next(iter(feats[args.pick].values()))) if args.split_by == "all" else [args.split_by]
    )
    print(f"| feature | median on {args.pick} | w above | w below | {args.pick} | {other} |")
    print("|---|---|---|---|---|---|")
    for name in names:
        threshold = statistics.median(f[name] for f in feats[args.pick].values())
        above = {c: {q for q, f in feats[c].items() if f[name] > threshold} for c in COLLECTIONS}
        rows, base, qrels = data[args.pick]
        best: tuple[float, float, float] | None = None
        for high in WEIGHTS:
            for low in WEIGHTS:
                r = compare(split_orders(rows, above[args.pick], high, low), base, qrels)
                if best is None or r["ndcg"] > best[0] + 1e-12:
                    best = (r["ndcg"], high, low)
        assert best is not None
        o_rows, o_base, o_qrels = data[other]
        tested = compare(split_orders(o_rows, above[other], best[1], best[2]), o_base, o_qrels)
        print(
            f"| {name} | {threshold:.3g} | {best[1]} | {best[2]} | {best[0]:.4f} | "
            f"{tested['ndcg']:.4f} ({tested['wins']}/{tested['losses']}) |"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--method", default="likelihood")
    p.add_argument("--pick", default="dl20", choices=list(COLLECTIONS))
    p.add_argument("--ranks", action="store_true", help="first stage from ranks, not scores")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="reorder only the first stage's first K (what scoring fewer passages would cost)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real")
    p.add_argument(
        "--combine",
        default=None,
        help="methods to fuse together with the first stage (comma-separated; MODEL:METHOD "
        "for another model's); weights on a 0.1 grid of the simplex, picked on --pick",
    )
    p.add_argument(
        "--split-by",
        default=None,
        help="two weights, for queries above and below the median of a feature "
        "(model_spread, model_gap, bm25_gap, bm25_spread, bm25_top, agreement, or all)",
    )
    args = p.parse_args()
    if args.combine:
        return main_combine(args)
    other = next(c for c in COLLECTIONS if c != args.pick)
    data = {}
    for collection in COLLECTIONS:
        requests, qrels = load_collection(collection, 20, None)
        base = {r.query.qid: [c.docid for c in r.candidates] for r in requests}
        rows = done_rows(args.out / args.model / args.method / f"{collection}.jsonl")
        data[collection] = (rows, base, qrels)
    if args.split_by:
        return main_split(args, data)
    first = "ranks" if args.ranks else "BM25 scores"
    print(f"{args.model} {args.method}; first stage from {first}; pick on {args.pick}")
    print("| w | " + " | ".join(f"{c} nDCG@10 (n)" for c in COLLECTIONS) + " |")
    print("|---|" + "---|" * len(COLLECTIONS))
    best: tuple[float, float] | None = None
    for w in [None, *WEIGHTS]:
        cells = []
        for collection in COLLECTIONS:
            rows, base, qrels = data[collection]
            if not rows:
                cells.append("-")
                continue
            r = compare(fused_orders(rows, w, args.ranks, args.top_k), base, qrels)
            cells.append(f"{r['ndcg']:.4f} ({r['queries']})")
            if collection == args.pick and (best is None or r["ndcg"] > best[1] + 1e-12):
                best = (w if w is not None else 1.0, r["ndcg"])
        label = "model only" if w is None else f"{w:.2f}"
        print(f"| {label} | " + " | ".join(cells) + " |")
    if best is None:
        return 1
    w = best[0]
    print(f"\nweight picked on {args.pick}: w = {w} ({best[1]:.4f})")
    for collection in (args.pick, other):
        rows, base, qrels = data[collection]
        if not rows:
            continue
        r = compare(fused_orders(rows, w, args.ranks, args.top_k), base, qrels)
        report(collection, "picked on" if collection == args.pick else "tested on", r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
