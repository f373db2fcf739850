"""``permrank simulate``: a simulated LLM server that answers window prompts from qrels."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

from permrank.sim.faults import add_fault_options, faults_from_args
from permrank.sim.noise import parse_noise

if TYPE_CHECKING:
    from permrank.sim.server import Corpus


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="serve a simulated OpenAI-compatible LLM that ranks from qrels (no GPU)",
        description="An OpenAI-compatible server on loopback that answers permutation prompts "
        "from the qrels of a data folder (candidates.jsonl[.gz] + qrels.txt), with seeded "
        "noise and latency. It finds the query and passages by their text, so any template "
        "works.",
    )
    p.add_argument("--data", help="folder with candidates.jsonl[.gz] and qrels.txt")
    p.add_argument("--candidates", help="candidates JSONL (instead of --data)")
    p.add_argument("--qrels", help="qrels file (instead of --data)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    p.add_argument(
        "--noise",
        default="0",
        metavar="SPEC",
        help="how the judge errs: a swap probability (0.1), or KEY:VALUE,... with keys swap "
        "(adjacent swap probability), bias (grades added at a window's ends), miss "
        "(probability a passage is left out), attention (passages read well), blur, seed; "
        "e.g. swap:0.1,bias:0.5,miss:0.02,attention:10 (0: exact)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    p.add_argument("--model", default="permrank-simulator", help="model name it reports")
    add_fault_options(p)
    p.set_defaults(func=run)


def corpus_from_args(args: argparse.Namespace) -> Corpus:
    from permrank.sim.server import Corpus

    if args.data:
        return Corpus.from_dir(args.data)
    if args.candidates and args.qrels:
        return Corpus.from_files(args.candidates, args.qrels)
    from permrank.core.errors import ConfigError

    raise ConfigError("give --data DIR, or both --candidates and --qrels")


def run(args: argparse.Namespace) -> int:
    from permrank.sim.server import Simulator

    sim = Simulator(
        corpus_from_args(args),
        host=args.host,
        port=args.port,
        noise=parse_noise(args.noise, seed=args.seed),
        latency_s=args.latency,
        faults=faults_from_args(args),
    )
    sim.state.model = args.model
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(
        f"permrank simulator: {sim.base_url} (model {args.model}, "
        f"{len(sim.state.corpus.queries)} queries)",
        flush=True,
    )
    try:
        sim.start()
        sim.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        sim.server.server_close()
    return 0
