"""Where a forced query-likelihood request's time goes, on the embedded llama.cpp server.

One slot, requests one after another, the recipe's prompt (UPR in a ChatML turn) for the first
10 candidates of the first DL19 queries. Three requests per passage, with llama.cpp's prompt
cache off: the prompt alone (1 token generated), the prompt plus the query's tokens forced by a
token grammar (what the ``likelihood`` method sends), and the prompt plus as many tokens
generated freely. The server's own timings split each into prompt processing and decoding;
figures are printed as ratios to the prompt-only request measured in the same run.

    PYTHONPATH=. python bench/bench_likelihood_cost.py [--model qwen2.5-coder-0.5b] [--queries 1]

Not a test: pytest does not collect bench/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from permrank.engine.methods.likelihood import CHAT_UPR_PROMPT  # noqa: E402
from permrank.runs.io import read_requests  # noqa: E402
from permrank.servers.llamacpp import LlamaServer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "trec-dl19" / "candidates.jsonl"


def post(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request) as answer:
        out = json.loads(answer.read())
    return out, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--passages", type=int, default=10)
    p.add_argument("--words", type=int, default=60, help="words of each passage shown (60)")
    args = p.parse_args()
    requests = list(read_requests(DATA))[: args.queries]
    kinds = ("prompt only", "forced query", "free decoding")
    seen: dict[str, list[tuple[float, dict[str, Any]]]] = {k: [] for k in kinds}
    with LlamaServer(args.model, parallel=1) as server:
        root = server.base_url.removesuffix("/v1")
        for request in requests:
            target = " " + request.query.text.strip()
            tokens = post(f"{root}/tokenize", {"content": target})[0]["tokens"]
            ids = [t if isinstance(t, int) else t["id"] for t in tokens]
            grammar = "root ::= " + " ".join(f"<[{i}]>" for i in ids)
            for candidate in request.candidates[: args.passages]:
                passage = " ".join(candidate.text.split()[: args.words])
                prompt = CHAT_UPR_PROMPT.format(passage=passage)
                common = {"prompt": prompt, "cache_prompt": False}
                bodies = {
                    "prompt only": {**common, "max_tokens": 1},
                    "forced query": {
                        **common,
                        "max_tokens": len(ids),
                        "logprobs": 1,
                        "grammar": grammar,
                    },
                    "free decoding": {
                        **common,
                        "max_tokens": len(ids),
                        "logprobs": 1,
                        "ignore_eos": True,
                    },
                }
                for kind, body in bodies.items():
                    out, seconds = post(f"{server.base_url}/completions", body)
                    seen[kind].append((seconds, out.get("timings", {})))
    base = statistics.mean(s for s, _ in seen["prompt only"])
    print(f"{args.model}, 1 slot, {len(seen['prompt only'])} passages of {args.words} words")
    print("| request | seconds | x prompt only | prompt ms | prompt tokens | decode ms | tokens |")
    print("|---|---|---|---|---|---|---|")
    for kind, rows in seen.items():
        seconds = statistics.mean(s for s, _ in rows)

        def timing(key: str, rows: list = rows) -> float:
            return statistics.mean(float(t.get(key, 0)) for _, t in rows)

        print(
            f"| {kind} | {seconds:.3f} | x{seconds / base:.2f} | {timing('prompt_ms'):.0f} | "
            f"{timing('prompt_n'):.0f} | {timing('predicted_ms'):.0f} | "
            f"{timing('predicted_n'):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
