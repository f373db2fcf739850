"""Scale-out: throughput against the number of endpoints (1, 2, 4) and of Ray actors.

Starts simulator endpoints (``permrank simulate --latency``, one process each) over TREC DL19 +
DL20 (97 queries), then runs ``permrank rerank`` as a user would (its own process, no cache):
over 1, 2 and 4 endpoints at a fixed per-endpoint concurrency, and with ``--ray local`` over 2
endpoints with 1 and 2 actors (same total concurrency as the local run over those endpoints).
Every run's output must be byte-identical to the one-endpoint run's. Reports queries per
second (from the run's manifest; for Ray also without its start-up), the speed-up, the cost per
query (calls, tokens, and endpoint-seconds: the run's time times its endpoints, per query)
and the peak memory of the ``permrank rerank`` process (for Ray, of the driver) as a Markdown
table.

    python bench/bench_endpoints.py                       # about 3 minutes on 2 cores
    python bench/bench_endpoints.py --endpoints 1 2 --ray-actors   # quicker, no Ray
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}


def build_input(folder: Path, repeat: int) -> tuple[Path, Path]:
    """DL19 + DL20, ``repeat`` times (the copies' qids suffixed ``#k``)."""
    candidates, qrels = folder / "candidates.jsonl", folder / "qrels.txt"
    with open(candidates, "w", encoding="utf-8") as c, open(qrels, "w", encoding="utf-8") as q:
        for k in range(repeat):
            suffix = f"#{k}" if k else ""
            for name in ("trec-dl19", "trec-dl20"):
                for line in (DATA / name / "candidates.jsonl").open(encoding="utf-8"):
                    record = json.loads(line)
                    record["qid"] = f"{record['qid']}{suffix}"
                    c.write(json.dumps(record, ensure_ascii=False) + "\n")
                for line in (DATA / name / "qrels.txt").open(encoding="utf-8"):
                    qid, rest = line.split(" ", 1)
                    q.write(f"{qid}{suffix} {rest}")
    return candidates, qrels


def start_simulators(n: int, candidates: Path, qrels: Path, latency: float) -> tuple[list, list]:
    procs, urls = [], []
    for _ in range(n):
        proc = subprocess.Popen(
            [PYTHON, "-m", "permrank", "simulate", "--candidates", str(candidates)]
            + ["--qrels", str(qrels), "--port", "0", "--latency", str(latency)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()  # "permrank simulator: http://127.0.0.1:PORT/v1 (...)"
        urls.append(line.split()[2])
        procs.append(proc)
    return procs, urls


def rerank(
    candidates: Path, out: Path, urls: list[str], args: argparse.Namespace, *more: str
) -> dict:
    command = ["/usr/bin/time", "-f", "%M", PYTHON, "-m", "permrank", "rerank"]
    command += ["--input", str(candidates), "--output", str(out), "--overwrite", "-q"]
    command += ["--no-cache", "--depth", str(args.depth), "--concurrency", str(args.concurrency)]
    for url in urls:
        command += ["--base-url", url]
    started = time.perf_counter()
    done = subprocess.run([*command, *more], env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rerank failed: {done.stderr[-3000:]}")
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    rss_kb = int(done.stderr.strip().splitlines()[-1])
    return {"manifest": manifest, "wall": wall, "rss_mb": rss_kb / 1024}


def row(
    label: str, result: dict, base_qps: float | None, n_endpoints: int, local: float | None = None
) -> tuple[str, float]:
    m = result["manifest"]
    queries = m["totals"]["queries"]
    qps = queries / m["seconds"]
    executor = m["parameters"].get("executor") or {}
    startup = executor.get("startup_s")
    steady = f"{queries / (m['seconds'] - startup):.2f}" if startup else "-"
    speedup = qps / base_qps if base_qps else 1.0
    versus = f"{speedup:.2f} ({speedup / n_endpoints:.2f} per endpoint)"
    if local is not None and startup:  # Ray against the local run over the same endpoints
        ratio = queries / (m["seconds"] - startup) / local
        versus = f"{ratio:.2f} of the local run ({qps / local:.2f} with start-up)"
    calls = m["totals"]["calls"] / queries
    tokens = (m["totals"]["prompt_tokens"] + m["totals"]["completion_tokens"]) / queries
    cost = m["seconds"] * n_endpoints / queries  # what renting the endpoints costs a query
    members = executor.get("endpoints") or m["parameters"]["backend"].get("endpoints") or []
    actor_peaks = [a.get("peak_rss_mb") or 0 for a in executor.get("actors") or []]
    actors_rss = f" (actors {max(actor_peaks):.0f})" if actor_peaks else ""
    share = "/".join(str(e["calls"]) for e in members) or str(m["totals"]["calls"])
    line = (
        f"| {label} | {m['seconds']:.1f} | {qps:.2f} | {steady} | {versus} "
        f"| {calls:.1f} | {tokens:,.0f} | {cost:.2f} "
        f"| {share} | {startup if startup else '-'} | {result['rss_mb']:.0f}{actors_rss} |"
    )
    return line, qps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.25, help="seconds per request (0.25)")
    parser.add_argument("--concurrency", type=int, default=4, help="per endpoint (4)")
    parser.add_argument("--depth", type=int, default=50, help="candidates per query (50)")
    parser.add_argument("--endpoints", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--ray-actors", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--ray-endpoints", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the 97 queries (1)")
    args = parser.parse_args()
    needed = max([*args.endpoints, args.ray_endpoints if args.ray_actors else 1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        candidates, qrels = build_input(folder, args.repeat)
        procs, urls = start_simulators(needed, candidates, qrels, args.latency)
        lines = [
            f"{sum(1 for _ in open(candidates))} queries (DL19 + DL20 x {args.repeat}), top "
            f"{args.depth}, "
            f"sliding window 20/10, {args.latency * 1000:.0f} ms per request, concurrency "
            f"{args.concurrency} per endpoint, `{os.cpu_count()}` CPU cores",
            "",
            "| run | seconds | queries/s | queries/s without start-up | speed-up | calls/query "
            "| tokens/query | endpoint-s/query | calls per endpoint | start-up s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        try:
            reference: bytes | None = None
            base_qps: float | None = None
            local_qps: dict[int, float] = {}
            for n in args.endpoints:
                out = folder / f"local-{n}.jsonl"
                result = rerank(candidates, out, urls[:n], args)
                reference = reference or out.read_bytes()
                assert out.read_bytes() == reference, f"{n} endpoints: rankings differ"
                line, qps = row(f"{n} endpoint{'s' * (n > 1)}", result, base_qps, n)
                base_qps = base_qps or qps
                local_qps[n] = qps
                lines.append(line)
                print(line, flush=True)
            for actors in args.ray_actors:
                n = args.ray_endpoints
                out = folder / f"ray-{actors}.jsonl"
                more = ("--ray", "local", "--ray-actors", str(actors))
                result = rerank(candidates, out, urls[:n], args, *more)
                if reference is not None:
                    assert out.read_bytes() == reference, f"Ray {actors}: rankings differ"
                label = f"Ray local, {actors} actor{'s' * (actors > 1)}, {n} endpoints"
                line, _ = row(label, result, base_qps, n, local_qps.get(n))
                lines.append(line)
                print(line, flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
