"""The fusion weight of a local model's recipe across every collection with saved scores.

Reads ``bench_real.py``'s per-query rows for DL19, DL20 (where recipes are chosen) and for the
check collections (SciFact, Cranfield: never used to choose), and prints nDCG@10 against BM25
for each weight of the model's min-max-normalised score (``permrank.engine.methods.likelihood.
fuse``, the code the method runs). Only queries scored in full are counted.

    PYTHONPATH=. python bench/fuse_check.py --model qwen2.5-coder-0.5b --method likelihood-chat
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real import (  # noqa: E402
    COLLECTIONS,
    OTHER_COLLECTIONS,
    compare,
    done_rows,
    fused_orders,
    load_collection,
)

WEIGHTS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 1.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--method", default="likelihood-chat")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "real")
    args = p.parse_args()
    print("| collection (queries) | BM25 | " + " | ".join(f"w={w}" for w in WEIGHTS) + " |")
    print("|---|---|" + "---|" * len(WEIGHTS))
    for collection in [*COLLECTIONS, *OTHER_COLLECTIONS]:
        rows = done_rows(args.out / args.model / args.method / f"{collection}.jsonl")
        if not rows:
            continue
        requests, qrels = load_collection(collection, 20, None)
        base = {r.query.qid: [c.docid for c in r.candidates] for r in requests}
        cells, bm25, n = [], 0.0, 0
        for weight in WEIGHTS:
            r = compare(fused_orders(rows, weight), base, qrels)
            bm25, n = r["bm25"], r["queries"]
            cells.append(f"{r['ndcg']:.4f} ({r['wins']}/{r['losses']})")
        print(f"| {collection} ({n}) | {bm25:.4f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
