"""Client CPU per request: ``OpenAIBackend.complete`` through each HTTP client, against the
simulator in a child process (its CPU is not counted), so only permrank's side is measured.

    PYTHONPATH=. python bench/bench_client.py                 # aiohttp and the openai SDK
    PYTHONPATH=. python bench/bench_client.py --requests 2000 --concurrency 32

Reported: client CPU milliseconds per request (process time, best and median of ``--repeats``).
Not a test: pytest does not collect bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_strategies import ROOT, SimulatorProcess  # noqa: E402

MESSAGES = [{"role": "user", "content": "hello " * 800}]  # a window-sized prompt (~5 kB)


async def cpu_per_request(base_url: str, transport: str, requests: int, concurrency: int) -> float:
    from permrank.backends.openai import OpenAIBackend

    backend = OpenAIBackend(base_url, "m", concurrency=concurrency, transport=transport)
    try:
        await asyncio.gather(*(backend.complete(MESSAGES, max_tokens=50) for _ in range(50)))
        started = time.process_time()
        await asyncio.gather(*(backend.complete(MESSAGES, max_tokens=50) for _ in range(requests)))
        return 1000 * (time.process_time() - started) / requests
    finally:
        await backend.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--transports", nargs="+", default=["aiohttp", "openai"])
    args = parser.parse_args(argv)
    print("| client | CPU ms/request (best) | CPU ms/request (median) |\n|---|---|---|")
    with SimulatorProcess(ROOT / "fixtures" / "dl19-5q", "0", 0.0) as sim:
        for transport in args.transports:
            runs = [
                asyncio.run(
                    cpu_per_request(sim.base_url, transport, args.requests, args.concurrency)
                )
                for _ in range(args.repeats)
            ]
            print(f"| {transport} | {min(runs):.3f} | {statistics.median(runs):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
