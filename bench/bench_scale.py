"""Scale: thousands of queries x 100 candidates streamed through the simulator, bounded memory.

Builds a synthetic collection from TREC DL19 + DL20 (each synthetic query is a DL query, made
unique by a prefix, with that query's 100 BM25 candidates in a shuffled order and its qrels),
starts ``permrank simulate`` on it in its own process, then runs ``permrank rerank`` (another
process, cache and TREC output on, as a user would) on the first 500 and on all 5,000 queries,
and reports the peak RSS of each rerank process. Memory is bounded when the second is close to
the first: the input is read and the output written as a stream.

    python bench/bench_scale.py                   # 500 and 5,000 queries (several minutes)
    python bench/bench_scale.py --sizes 50 500    # quicker
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")


def source_queries() -> list[dict]:
    queries = []
    for name in ("trec-dl19", "trec-dl20"):
        with open(DATA / name / "candidates.jsonl", encoding="utf-8") as f:
            queries.extend(json.loads(line) for line in f)
    return queries


def source_qrels() -> dict[str, list[str]]:
    qrels: dict[str, list[str]] = {}
    for name in ("trec-dl19", "trec-dl20"):
        with open(DATA / name / "qrels.txt", encoding="utf-8") as f:
            for line in f:
                qid, _, docid, grade = line.split()
                qrels.setdefault(qid, []).append(f"{docid} {grade}")
    return qrels


def build(folder: Path, n: int, passage_words: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` synthetic queries (streamed, one at a time) and their qrels."""
    rng = random.Random(seed)
    sources = source_queries()
    qrels = source_qrels()
    candidates_path, qrels_path = folder / "candidates.jsonl", folder / "qrels.txt"
    with open(candidates_path, "w", encoding="utf-8") as out, open(qrels_path, "w") as q:
        for i in range(n):
            src = sources[i % len(sources)]
            qid = f"s{i}"
            candidates = [
                {**c, "text": " ".join(c["text"].split()[:passage_words])}
                for c in src["candidates"]
            ]
            rng.shuffle(candidates)
            record = {"qid": qid, "query": f"q{i} {src['query']}", "candidates": candidates}
            out.write(json.dumps(record) + "\n")
            for judged in qrels.get(src["qid"], []):
                q.write(f"{qid} 0 {judged}\n")
    return candidates_path, qrels_path


def start_simulator(candidates: Path, qrels: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "permrank", "simulate", "--candidates", str(candidates)]
        + ["--qrels", str(qrels), "--port", "0"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"http://\S+/v1", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the simulator did not start: {line!r}")
    return proc, found.group(0)


def rerank(
    candidates: Path,
    qrels: Path,
    url: str,
    limit: int,
    folder: Path,
    extra: list[str],
    with_qrels: bool = False,
) -> dict:
    """Run ``permrank rerank`` in its own process; its peak RSS (MiB), time and summary."""
    out = folder / f"out-{limit}.jsonl.gz"
    command = [sys.executable, "-m", "permrank", "rerank", "--input", str(candidates)]
    command += ["--output", str(out), "--trec", str(folder / f"out-{limit}.trec")]
    command += ["--base-url", url, "--model", "permrank-simulator", "--limit", str(limit)]
    command += ["--cache", str(folder / f"cache-{limit}.sqlite")]
    if with_qrels:  # the evaluation at the end holds every query's run: O(queries) by nature
        command += ["--qrels", str(qrels)]
    command += extra
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    summary = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"rerank failed ({proc.returncode}):\n{summary}")
    with gzip.open(out, "rt", encoding="utf-8") as f:
        written = sum(1 for _ in f)
    assert written == limit, (written, limit)
    return {
        "queries": limit,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
        "seconds": seconds,
        "summary": summary.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 5000], metavar=("N1", "N2"))
    parser.add_argument(
        "--passage-words", type=int, default=40, help="passages cut to N words (40)"
    )
    parser.add_argument(
        "--rerank-args",
        default="--window-size 20 --step 10 --concurrency 16",
        help="extra arguments of permrank rerank",
    )
    parser.add_argument(
        "--with-qrels",
        action="store_true",
        help="also print nDCG@10 (its evaluation holds all queries in memory at the end)",
    )
    args = parser.parse_args()
    small, large = args.sizes
    with tempfile.TemporaryDirectory(prefix="permrank-scale-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        candidates, qrels = build(folder, large, args.passage_words)
        size_mib = candidates.stat().st_size / 2**20
        print(
            f"input: {large} queries x 100 candidates, {size_mib:.0f} MiB "
            f"(built in {time.perf_counter() - t0:.0f} s)"
        )
        sim, url = start_simulator(candidates, qrels)
        try:
            results = [
                rerank(candidates, qrels, url, n, folder, args.rerank_args.split(), args.with_qrels)
                for n in (small, large)
            ]
        finally:
            sim.terminate()
            sim.wait()
    base = results[0]
    for r in results:
        print(
            f"{r['queries']:>6} queries: peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x the {base['queries']}-query run), "
            f"{r['seconds']:.0f} s ({r['queries'] / r['seconds']:.1f} queries/s)"
        )
        for line in r["summary"].splitlines():
            print(f"        {line}")
    ratio = results[1]["peak_rss_mib"] / base["peak_rss_mib"]
    verdict = "bounded" if ratio <= 1.5 else "NOT bounded"
    print(
        f"memory {verdict}: {large} queries use {ratio:.2f}x the peak RSS of {small} (limit 1.5x)"
    )


if __name__ == "__main__":
    main()
