"""Query likelihood from each query token's logprob, not only their mean (offline, one server
start for the queries alone).

``bench_real.py`` keeps each query token's logprob given the passage (``token_logprobs``, from
the likelihood method's trace). This script asks the same model, once a query, for the query
tokens' logprobs with an empty passage (the query's likelihood without evidence), and tries
passage scores that weigh the tokens differently:

- ``mean``: the method's score (UPR's average);
- ``idf g``: a weighted mean, each token weighted by ``(-logprob without the passage) ** g``:
  the tokens the model could not guess without the passage count more (g = 0 is ``mean``);
- ``skip first``: the mean without the first token (MS MARCO's queries are lower-case, and the
  model expects a capital after "Question:": the first token's logprob is mostly that);
- ``floor f``: the mean of ``max(logprob, f)``: one token the passage makes very unlikely
  costs at most ``f``;
- ``power e``: ``-mean((-logprob) ** e)``: the other way, unlikely tokens cost more;
- ``token z`` / ``token ranks``: each query token's logprobs normalised across the query's
  passages (z-scores, softened ones, or ranks), then summed: every query word has one voice;
- ``capped c``: the mean of ``min(pmi, c)``, ``pmi = logprob with - logprob without the
  passage``: a passage gains from explaining a token at most ``c`` nats, so one echoed rare word
  does not outweigh the rest of the query.

Each family's parameter and its fusion weight with BM25 (``w * minmax(score) + (1 - w) *
minmax(BM25)``, as the recipes fuse) are picked on one collection (``--pick``) and reported on
the other, never on the same. Measured with the 0.5B (AMX kernels, 200-token passages; rows in
``bench/results/ql-tokens/``): DL20 picks the plain mean (0.5570 at w = 0.8, DL19 0.5984); no
weighing beats it on DL20 (docs/local-models.md, "Weighing the query's tokens").

    PYTHONPATH=. python bench/bench_real.py --models qwen2.5-coder-0.5b --methods \\
        likelihood-chat --parallel 4 --max-passage-tokens 200 --out bench/results/ql-tokens
    PYTHONPATH=. python bench/ql_tokens.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_real import (  # noqa: E402
    COLLECTIONS,
    EACH_TOKEN,
    compare,
    done_rows,
    fused_orders,
    load_collection,
    reranker_for,
)

WEIGHTS = [round(0.05 * i, 2) for i in range(21)]
Score = Callable[[list[float], list[float]], float]
QueryScore = Callable[[list[list[float]], list[float]], list[float]]
"""Every passage's score of a query, from the passages' token logprobs (and the query's own)."""


def without_passage(args: argparse.Namespace, collection: str) -> dict[str, list[float]]:
    """Each query's token logprobs given an empty passage, asked once and kept beside the rows."""
    path = args.out / args.model / args.method / f"{collection}.without-passage.json"
    if path.is_file():
        return json.loads(path.read_text())
    from permrank.core.types import Candidate, Request
    from permrank.servers.llamacpp import LlamaServer

    requests, _ = load_collection(collection, 20, None)
    out: dict[str, list[float]] = {}
    with LlamaServer(args.model, parallel=4).start() as server:
        with reranker_for(server, args.method, 200, 4096) as reranker:
            asked = [
                Request(query=r.query, candidates=[Candidate(docid="-", text="")]) for r in requests
            ]
            for request, ranking in zip(asked, reranker.rerank_batch(asked), strict=True):
                for trace in ranking.trace:
                    each = EACH_TOKEN.search(trace.answer or "")
                    if trace.score is not None and each:
                        out[request.query.qid] = [float(v) for v in each.group(1).split()]
    path.write_text(json.dumps(out))
    return out


def families() -> dict[str, Score]:
    out: dict[str, Score] = {"mean": lambda lp, u: sum(lp) / len(lp)}
    for g in (0.5, 1.0, 1.5, 2.0, 3.0):
        out[f"idf {g}"] = lambda lp, u, g=g: (
            sum(max(-b, 1e-6) ** g * a for a, b in zip(lp, u, strict=True))
            / sum(max(-b, 1e-6) ** g for b in u)
        )
    for c in (0.5, 1.0, 2.0, 3.0, 5.0):
        out[f"capped {c}"] = lambda lp, u, c=c: (
            sum(min(a - b, c) for a, b in zip(lp, u, strict=True)) / len(lp)
        )
    for f in (-8.0, -10.0, -15.0):
        out[f"floor {f:g}"] = lambda lp, u, f=f: sum(max(a, f) for a in lp) / len(lp)
    for e in (1.25, 1.5, 2.0):
        out[f"power {e}"] = lambda lp, u, e=e: -sum((-min(a, 0.0)) ** e for a in lp) / len(lp)
    out["skip first"] = lambda lp, u: sum(lp[1:]) / max(len(lp) - 1, 1)
    for c in (1.0, 2.0, 3.0):
        out[f"skip first, capped {c}"] = lambda lp, u, c=c: (
            sum(min(a - b, c) for a, b in zip(lp[1:], u[1:], strict=True)) / max(len(lp) - 1, 1)
        )
    return out


def per_passage(score: Score) -> QueryScore:
    return lambda matrix, u: [score(lp, u) for lp in matrix]


def across_passages() -> dict[str, QueryScore]:
    """Each query token's logprobs normalised across the query's passages, then summed, so that
    every query word has one voice (a rare word's wide logprobs do not outweigh the rest)."""
    import statistics

    def z(matrix: list[list[float]], soften: float) -> list[float]:
        out = [0.0] * len(matrix)
        for column in zip(*matrix, strict=True):
            mean, sd = statistics.fmean(column), statistics.pstdev(column)
            for i, v in enumerate(column):
                out[i] += (v - mean) / (sd + soften) if sd + soften else 0.0
        return out

    def ranks(matrix: list[list[float]], u: list[float]) -> list[float]:
        out = [0.0] * len(matrix)
        for column in zip(*matrix, strict=True):
            for r, i in enumerate(sorted(range(len(column)), key=column.__getitem__)):
                out[i] += r
        return out

    return {
        "token z": lambda m, u: z(m, 0.0),
        "token z, sd + 2": lambda m, u: z(m, 2.0),
        "token ranks": ranks,
    }


def rescored(rows: dict, base: dict[str, list[float]], score: QueryScore) -> dict:
    """Rows with each passage's score from the query tokens' logprobs."""
    out = {}
    for qid, row in rows.items():
        tokens = row.get("token_logprobs") or {}
        u = base.get(qid)
        docids = row["input"]
        if u is None or any(d not in tokens or len(tokens[d]) != len(u) for d in docids):
            continue
        values = score([tokens[d] for d in docids], u)
        out[qid] = {**row, "scores": dict(zip(docids, values, strict=True))}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--method", default="likelihood-chat+amx")
    p.add_argument("--pick", default="dl20", choices=list(COLLECTIONS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ql-tokens")
    args = p.parse_args()
    other = next(c for c in COLLECTIONS if c != args.pick)
    data = {}
    for collection in COLLECTIONS:
        requests, qrels = load_collection(collection, 20, None)
        base = {r.query.qid: [c.docid for c in r.candidates] for r in requests}
        rows = done_rows(args.out / args.model / args.method / f"{collection}.jsonl")
        data[collection] = (rows, without_passage(args, collection), base, qrels)
    print(f"{args.model} {args.method}: picked on {args.pick}, tested on {other}")
    print(f"| score | w (picked) | {args.pick} | {other} | {other} w=0.6 | {other} alone |")
    print("|---|---|---|---|---|---|")
    best = None
    scores = {name: per_passage(score) for name, score in families().items()}
    for name, score in {**scores, **across_passages()}.items():
        picked = None
        for w in WEIGHTS:
            rows, u, base, qrels = data[args.pick]
            r = compare(fused_orders(rescored(rows, u, score), w), base, qrels)
            if picked is None or r["ndcg"] > picked[1] + 1e-12:
                picked = (w, r["ndcg"])
        assert picked is not None
        rows, u, base, qrels = data[other]
        scored = rescored(rows, u, score)
        tested = compare(fused_orders(scored, picked[0]), base, qrels)
        at_06 = compare(fused_orders(scored, 0.6), base, qrels)
        alone = compare(fused_orders(scored, None), base, qrels)
        print(
            f"| {name} | {picked[0]} | {picked[1]:.4f} | {tested['ndcg']:.4f} "
            f"({tested['wins']}/{tested['losses']}, {tested['queries']} q) | "
            f"{at_06['ndcg']:.4f} | {alone['ndcg']:.4f} |"
        )
        if best is None or picked[1] > best[1] + 1e-12:
            best = (name, picked[1], tested["ndcg"])
    assert best is not None
    print(f"\nbest on {args.pick}: {best[0]} ({best[1]:.4f}); on {other}: {best[2]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
