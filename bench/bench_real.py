"""Every scoring method with the named local models on all of TREC DL19 and DL20 (BM25 top-20).

For each model the embedded llama.cpp server is started once (2 threads), and every method in
``--methods`` reranks every query of every collection through permrank's own pipeline (no
cache). Each reranked query is appended to ``OUT/MODEL/METHOD/COLLECTION.jsonl`` (``METHOD+amx``
when the server ran llama.cpp's AMX kernels, from a Q8_0 copy: other weights and other timings,
kept apart) as soon as it is done (the new order, each passage's score from the trace, calls,
tokens, seconds), so a killed run resumes where it stopped. The table (``OUT/results.md``) gives
nDCG@10 against BM25's with per-query wins/losses and a paired t-test p-value, calls, tokens and
seconds per query; partial collections are marked. The per-passage scores let interpolation
weights and normalisations be explored offline (``bench/fuse_offline.py``) without asking the
model again.

    PYTHONPATH=. python bench/bench_real.py --models qwen2.5-coder-0.5b --methods likelihood
    PYTHONPATH=. python bench/bench_real.py --table-only        # rewrite the table from OUT

Not a test: pytest does not collect bench/. It can run for hours on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from permrank.core.types import Request, Usage  # noqa: E402
from permrank.runs.evaluate import per_query, read_qrels  # noqa: E402
from permrank.runs.io import read_requests  # noqa: E402
from permrank.servers.models import QWEN_05B_WEIGHT as RECIPE_WEIGHT  # noqa: E402

DATA = Path(os.environ.get("PERMRANK_DATA", ROOT.parent / "shared" / "data"))
COLLECTIONS = {"dl19": "trec-dl19", "dl20": "trec-dl20"}
OTHER_COLLECTIONS = {"scifact": "scifact", "cranfield": "cranfield"}
"""Collections the recipes were not chosen on (``--collections scifact,cranfield``): a check."""
EACH_TOKEN = re.compile(r"\(each: ([-0-9. e]+)\)")
"""Each query token's logprob, as the likelihood method's trace lists them (``token_logprobs``
in the rows, for ``bench/ql_tokens.py``)."""
MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m")

FEWSHOT_TURNS = "".join(
    "<|im_start|>user\nWrite a search query that the passage below answers.\n"
    f"Passage: {passage}<|im_end|>\n<|im_start|>assistant\nQuery: {query}<|im_end|>\n"
    for passage, query in (
        (
            "The Great Barrier Reef is the world's largest coral reef system, made of over "
            "2,900 individual reefs and 900 islands stretching over 2,300 kilometres off the "
            "coast of Queensland, Australia.",
            "where is the great barrier reef",
        ),
        (
            "To convert a temperature from Celsius to Fahrenheit, multiply it by 1.8 and add "
            "32. For example, 20 degrees Celsius is 68 degrees Fahrenheit.",
            "how to convert celsius to fahrenheit",
        ),
    )
)
"""Two examples written for the few-shot variant (not from any collection): earlier turns of
the same chat, shared by every prompt, so llama.cpp's prompt cache reads them once a slot."""

METHODS: dict[str, dict[str, Any]] = {
    "listwise": {"method": "listwise"},
    "pointwise": {"method": "pointwise"},
    "pointwise-graded": {"method": "pointwise", "method_options": {"labels": "graded"}},
    "likelihood": {"method": "likelihood", "method_options": {"mode": "forced"}},
    "likelihood-chat": {
        "method": "likelihood",
        "method_options": {"mode": "forced", "prompt": "chat-upr"},
    },
    "likelihood-chat-cap": {
        "method": "likelihood",
        "method_options": {"mode": "forced", "prompt": "chat-upr", "capitalise": True},
    },
    "likelihood-chat-query": {
        "method": "likelihood",
        "method_options": {
            "mode": "forced",
            "prompt": "<|im_start|>user\nPassage: {passage}\nWrite a search query that this "
            "passage is relevant to.<|im_end|>\n<|im_start|>assistant\nQuery:",
        },
    },
    "likelihood-chat-first": {
        "method": "likelihood",
        "method_options": {
            "mode": "forced",
            "prompt": "<|im_start|>user\nWrite a question that the passage below answers.\n"
            "Passage: {passage}<|im_end|>\n<|im_start|>assistant\nQuestion:",
        },
    },
    "likelihood-chat-fewshot": {
        "method": "likelihood",
        "method_options": {
            "mode": "forced",
            "prompt": FEWSHOT_TURNS
            + "<|im_start|>user\nWrite a search query that the passage below answers.\n"
            "Passage: {passage}<|im_end|>\n<|im_start|>assistant\nQuery:",
        },
    },
    "first": {"method": "first"},
    "pairwise": {"method": "pairwise"},
}
"""Method variants by name: what the Reranker is given (scores are fused offline)."""


def t_test_p(diffs: list[float]) -> float:
    """Two-sided p-value of a paired t-test on per-query differences."""
    n = len(diffs)
    if n < 2:
        return float("nan")
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 1.0 if statistics.mean(diffs) == 0 else 0.0
    t = statistics.mean(diffs) / (sd / math.sqrt(n))
    return student_t_two_sided(abs(t), n - 1)


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| >= t) for Student's t with ``df`` degrees of freedom (regularised incomplete beta)."""
    x = df / (df + t * t)
    return _betainc(df / 2.0, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    # Lentz's continued fraction.
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1.0 + num / (c if abs(c) > 1e-30 else 1e-30)
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0) / a


def load_collection(name: str, depth: int, limit: int | None) -> tuple[list[Request], dict]:
    folder = DATA / {**COLLECTIONS, **OTHER_COLLECTIONS}[name]
    requests = []
    source = folder / "candidates.jsonl"
    for request in read_requests(source if source.exists() else f"{source}.gz"):
        request.candidates = request.candidates[:depth]
        requests.append(request)
    qrels = read_qrels(folder / "qrels.txt")
    requests = [r for r in requests if r.query.qid in qrels]
    return requests[:limit] if limit else requests, qrels


def run_of_orders(rows: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    return {qid: {d: float(len(ds) - i) for i, d in enumerate(ds)} for qid, ds in rows.items()}


def compare(rows: dict[str, list[str]], base: dict[str, list[str]], qrels: dict) -> dict[str, Any]:
    """nDCG@10 of ``rows`` against ``base`` on the same queries: means, wins, losses, p."""
    ours = per_query(run_of_orders(rows), qrels, "nDCG@10")
    theirs = per_query(run_of_orders({q: base[q] for q in rows}), qrels, "nDCG@10")
    qids = sorted(rows)
    a = [ours.get(q, 0.0) for q in qids]
    b = [theirs.get(q, 0.0) for q in qids]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return {
        "queries": len(qids),
        "ndcg": statistics.mean(a) if a else float("nan"),
        "bm25": statistics.mean(b) if b else float("nan"),
        "wins": sum(d > 1e-9 for d in diffs),
        "losses": sum(d < -1e-9 for d in diffs),
        "p": t_test_p(diffs),
    }


def done_rows(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: asked again
            rows[row["qid"]] = row
    return rows


def reranker_for(server: Any, method: str, max_passage_tokens: int, ctx: int) -> Any:
    """A Reranker asking ``server`` (an embedded llama.cpp) with the variant ``method`` (no
    cache; the server's own tokenizer; as many requests in flight as it has slots)."""
    from permrank.backends.tokenizer import ServerTokenizer
    from permrank.engine.reranker import Reranker

    spec = METHODS[method.removesuffix("+amx")]
    return Reranker(
        model=server.model,
        base_url=server.base_url,
        method=spec["method"],
        method_options=spec.get("method_options"),
        max_passage_tokens=max_passage_tokens,
        context_window=ctx,
        concurrency=server.parallel,
        timeout_s=900.0,
        tokenizer=ServerTokenizer(
            server.base_url.removesuffix("/v1"), kind="llama.cpp", model=server.model
        ),
        cache=None,
    )


def run_one(
    args: argparse.Namespace, server: Any, model: str, method: str, collection: str
) -> None:
    requests, _ = load_collection(collection, args.depth, args.limit)
    # Rows from llama.cpp's AMX kernels (a Q8_0 copy of a Q4_K_M model, permrank.servers.amx)
    # are kept apart: other weights, other timings.
    variant = f"{method}+amx" if getattr(server, "amx", None) else method
    path = args.out / model / variant / f"{collection}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows(path)
    todo = [r for r in requests if r.query.qid not in done]
    if not todo:
        return
    reranker = reranker_for(server, method, args.max_passage_tokens, args.ctx)
    print(f"{model} {variant} {collection}: {len(todo)} queries to go", flush=True)
    with reranker, path.open("a") as out:
        for request in todo:
            started = time.perf_counter()
            ranking = reranker.rerank_batch([request])[0]
            scores: dict[str, float] = {}
            tokens: dict[str, list[float]] = {}
            for trace in ranking.trace:
                if trace.score is not None and len(trace.docids) == 1:
                    scores[trace.docids[0]] = trace.score
                    each = EACH_TOKEN.search(trace.answer or "")
                    if each:
                        tokens[trace.docids[0]] = [float(v) for v in each.group(1).split()]
            usage: Usage = ranking.usage
            row = {
                "qid": request.query.qid,
                "order": ranking.docids,
                "bm25": [c.score for c in request.candidates],
                "input": [c.docid for c in request.candidates],
                "scores": scores,
                **({"token_logprobs": tokens} if tokens else {}),
                "calls": usage.calls,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "repairs": usage.repairs,
                "seconds": time.perf_counter() - started,
                "error": ranking.error,
                "max_passage_tokens": args.max_passage_tokens,
                "model_file": server.model_path.name,
                "amx": server.amx,
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(
                f"  {request.query.qid}: {row['seconds']:.1f} s, {usage.calls} calls",
                flush=True,
            )


def passage_cut(rows: dict[str, dict[str, Any]]) -> str:
    """The passage cut (tokens) the rows were run with ("?" for rows written before it was kept)."""
    cuts = sorted({str(row.get("max_passage_tokens", "?")) for row in rows.values()})
    return "/".join(cuts)


def fused_orders(
    rows: dict[str, dict[str, Any]],
    weight: float | None,
    ranks: bool = False,
    top_k: int | None = None,
) -> dict[str, list[str]]:
    """Each query ordered by its per-passage scores fused with the first stage's, as the recipes
    fuse (BM25's scores; its ranks with ``ranks``); queries scored only in part are left out.
    ``top_k``: only the first stage's first k are reordered (as the methods' ``top_k`` does, the
    rest follow in input order), to see what scoring fewer passages would cost."""
    from permrank.core.types import Candidate
    from permrank.engine.methods.likelihood import fuse

    out = {}
    for qid, row in rows.items():
        docids = row["input"]
        if any(d not in row["scores"] for d in docids):
            continue  # scored only in part (an error): left out
        k = len(docids) if top_k is None else min(top_k, len(docids))
        cands = [
            Candidate(docid=d, text="", score=None if ranks else s)
            for d, s in zip(docids[:k], row["bm25"][:k], strict=True)
        ]
        fused = fuse([row["scores"][d] for d in docids[:k]], cands, weight)
        order = sorted(range(k), key=lambda i: (-fused[i], i))
        out[qid] = [docids[i] for i in order] + docids[k:]
    return out


def table(args: argparse.Namespace) -> str:
    lines = [
        "| model | method | cut | collection | queries | nDCG@10 | BM25 | delta | wins/losses "
        "| p | calls/q | tokens/q | s/q |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for collection in COLLECTIONS:
        requests, qrels = load_collection(collection, args.depth, None)
        base = {r.query.qid: [c.docid for c in r.candidates] for r in requests}
        for model_dir in sorted(p for p in args.out.iterdir() if p.is_dir()):
            for method_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                rows = done_rows(method_dir / f"{collection}.jsonl")
                if not rows:
                    continue
                r = compare({q: row["order"] for q, row in rows.items()}, base, qrels)
                n = len(rows)
                calls = sum(row["calls"] for row in rows.values()) / n
                tokens = (
                    sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows.values())
                    / n
                )
                secs = sum(row["seconds"] for row in rows.values()) / n
                partial = "" if n == len(base) else f" (partial, of {len(base)})"
                cut = passage_cut(rows)
                cost = f"{calls:.0f} | {tokens:.0f} | {secs:.1f}"
                lines.append(
                    f"| {model_dir.name} | {method_dir.name} | {cut} | {collection} | "
                    f"{n}{partial} | {r['ndcg']:.4f} | {r['bm25']:.4f} | "
                    f"{r['ndcg'] - r['bm25']:+.4f} | {r['wins']}/{r['losses']} | {r['p']:.3g} | "
                    f"{cost} |"
                )
                if args.fuse is not None and any(row["scores"] for row in rows.values()):
                    fused = fused_orders(rows, args.fuse)
                    f = compare(fused, base, qrels)
                    lines.append(
                        f"| {model_dir.name} | {method_dir.name} + BM25 (w={args.fuse}) | {cut} | "
                        f"{collection} | {f['queries']}{partial} | {f['ndcg']:.4f} | "
                        f"{f['bm25']:.4f} | {f['ndcg'] - f['bm25']:+.4f} | "
                        f"{f['wins']}/{f['losses']} | {f['p']:.3g} | {cost} |"
                    )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--collections", default=",".join(COLLECTIONS))
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="first N queries of each collection")
    p.add_argument("--max-passage-tokens", type=int, default=100)
    p.add_argument("--parallel", type=int, default=1, help="llama.cpp slots (1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=4096, help="context per slot (4096)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real")
    p.add_argument("--table-only", action="store_true")
    p.add_argument(
        "--fuse",
        type=float,
        default=RECIPE_WEIGHT,
        help="also list each scoring method fused with BM25 at this weight, as the recipes do "
        f"(default {RECIPE_WEIGHT}, the default model's; a negative value: no fused rows)",
    )
    args = p.parse_args()
    if args.fuse is not None and args.fuse < 0:
        args.fuse = None
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        from permrank.servers.llamacpp import LlamaServer

        for model in args.models.split(","):
            server = LlamaServer(model, ctx=args.ctx, parallel=args.parallel, threads=args.threads)
            with server.start():
                for method in args.methods.split(","):
                    if method not in METHODS:
                        raise SystemExit(f"unknown method {method!r}: {', '.join(METHODS)}")
                    for collection in args.collections.split(","):
                        run_one(args, server, model, method, collection)
            (args.out / "results.md").write_text(table(args))
    text = table(args)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
