"""Wall time of `permrank rerank` at several --concurrency values against a slow simulator.

The simulator (`permrank simulate`, its own process) answers every window after a fixed
latency (200 ms by default), so the run is bound by waiting, as with a real remote model. Each
concurrency runs the same CLI command in a fresh process; the figures are ratios against the
first (baseline) concurrency measured in the same run.

    python bench/bench_concurrency.py                       # DL19, 200 ms, --concurrency 1 vs 16
    python bench/bench_concurrency.py --concurrency 1 4 16 --limit 10
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
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "trec-dl19"


def start_simulator(
    data: Path, latency: float, env: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "permrank", "simulate", "--data", str(data), "--port", "0"]
    server = subprocess.Popen(
        [*command, "--latency", str(latency)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert server.stdout is not None
    banner = server.stdout.readline()  # "permrank simulator: http://127.0.0.1:PORT/v1 (...)"
    if not banner.startswith("permrank simulator: "):
        server.kill()
        raise SystemExit(f"the simulator did not start: {banner!r}")
    return server, banner.split()[2]


def run_rerank(
    data: Path, base_url: str, concurrency: int, limit: int | None, out: Path, env: dict[str, str]
) -> tuple[float, dict]:
    command = [
        sys.executable,
        "-m",
        "permrank",
        "rerank",
        "--input",
        str(data / "candidates.jsonl"),
        "--output",
        str(out),
        "--base-url",
        base_url,
        "--model",
        "permrank-simulator",
        "--concurrency",
        str(concurrency),
        "--no-cache",  # every window asked of the simulator: no answers from an earlier run
        "-q",
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    return wall, json.loads(Path(f"{out}.manifest.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="simulator data folder")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per answer (0.2)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16], help="values; first is baseline"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N queries")
    args = parser.parse_args()
    if not (args.data / "candidates.jsonl").exists():
        raise SystemExit(f"no {args.data}/candidates.jsonl: give --data")

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server, base_url = start_simulator(args.data, args.latency, env)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for concurrency in args.concurrency:
                out = Path(tmp) / f"c{concurrency}.jsonl"
                wall, manifest = run_rerank(args.data, base_url, concurrency, args.limit, out, env)
                rows.append((concurrency, wall, manifest["seconds"], manifest["totals"]))
    finally:
        server.terminate()
        server.wait(timeout=10)

    base_wall, base_run = rows[0][1], rows[0][2]
    print(f"data {args.data}, simulator latency {args.latency * 1000:.0f} ms per request")
    print(
        f"{'concurrency':>11} {'queries':>7} {'calls':>6} {'wall s':>8} {'run s':>8} "
        f"{'speed-up (wall)':>15} {'speed-up (run)':>14}"
    )
    for concurrency, wall, run_s, totals in rows:
        print(
            f"{concurrency:>11} {totals['queries']:>7} {totals['calls']:>6} {wall:>8.2f} "
            f"{run_s:>8.2f} {base_wall / wall:>14.2f}x {base_run / run_s:>13.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
