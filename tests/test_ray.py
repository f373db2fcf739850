"""Reranking on Ray (``--ray``, ``permrank.distributed``): same output files as a local run.

One Ray instance (2 CPUs) serves the whole module: Ray's start-up is slow on a small machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from permrank.cli.main import main
from permrank.sim.noise import parse_noise
from permrank.sim.server import Corpus, Simulator

if os.environ.get("CI"):
    import ray  # CI installs the ray extra: a missing Ray is a failure there
else:
    ray = pytest.importorskip("ray", reason="Ray is in the ray extra")
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
DL19 = ROOT.parent / "shared" / "data" / "trec-dl19"
if not DL19.exists():
    DL19 = Path("/work/shared/data/trec-dl19")
MODEL = "permrank-simulator"


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def replicas_of(data: Path, n: int, latency_s: float) -> list[Simulator]:
    corpus = Corpus.from_files(data / "candidates.jsonl", data / "qrels.txt")
    noise = parse_noise("0.2", seed=5)
    return [Simulator(corpus, noise=noise, latency_s=latency_s).start() for _ in range(n)]


@pytest.fixture(scope="module")
def two_replicas(dl19_5q: Path) -> Iterator[list[Simulator]]:
    sims = replicas_of(dl19_5q, 2, 0.01)
    yield sims
    for sim in sims:
        sim.stop()


def rerank_args(input_path: Path, output: Path, urls: list[str], *more: str) -> list[str]:
    args = ["rerank", "--input", str(input_path), "--output", str(output), "-q", "--no-cache"]
    args += ["--model", MODEL, "--window-size", "10", "--step", "5", *more]
    for url in urls:
        args += ["--base-url", url]
    return args


def ray_workers() -> list[int]:
    """PIDs of this machine's processes running a permrank actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::BlockReranker"):
                pids.append(int(entry.name))
    return pids


def test_ray_run_writes_what_a_local_run_writes(ray_instance, two_replicas, dl19_5q, tmp_path):
    urls = [s.base_url for s in two_replicas]
    source = dl19_5q / "candidates.jsonl"
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(rerank_args(source, local, urls, "--trec", str(tmp_path / "local.trec"))) == 0
    more = ("--trec", str(tmp_path / "ray.trec"), "--ray", "auto", "--ray-block-size", "2")
    assert main(rerank_args(source, on_ray, urls, *more)) == 0
    assert on_ray.read_bytes() == local.read_bytes()
    assert (tmp_path / "ray.trec").read_bytes() == (tmp_path / "local.trec").read_bytes()
    manifest = json.loads(Path(f"{on_ray}.manifest.json").read_text())
    executor = manifest["parameters"]["executor"]
    assert executor["name"] == "ray" and executor["workers"] == 2
    assert executor["address"] == ray.get_runtime_context().gcs_address
    assert len(set(executor["worker_pids"])) == 2 and os.getpid() not in executor["worker_pids"]
    totals = {e["endpoint"]: e["calls"] for e in executor["endpoints"]}
    assert set(totals) == set(urls) and all(totals.values())
    assert sum(totals.values()) == manifest["totals"]["calls"]
    backend = manifest["parameters"]["backend"]  # the driver's pool says what the actors did
    assert {e["endpoint"]: e["calls"] for e in backend["endpoints"]} == totals
    assert manifest["totals"]["queries"] == 5 and manifest["complete"] is True
    deadline = time.monotonic() + 30  # the actors are gone with the run (Ray kills them)
    while set(ray_workers()) & set(executor["worker_pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(ray_workers()) & set(executor["worker_pids"])


def test_ray_run_resumes_a_local_run(ray_instance, two_replicas, dl19_5q, tmp_path):
    urls = [s.base_url for s in two_replicas]
    source = dl19_5q / "candidates.jsonl"
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert main(rerank_args(source, reference, urls)) == 0
    assert main(rerank_args(source, out, urls, "--limit", "2")) == 0
    calls_before = sum(s.state.requests for s in two_replicas)
    assert main(rerank_args(source, out, urls, "--ray", "auto")) == 0
    assert out.read_bytes() == reference.read_bytes()
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["resumed_queries"] == 2 and manifest["this_run"]["queries"] == 3
    assert manifest["totals"]["queries"] == 5  # the run store's totals include the earlier part
    this_run = manifest["this_run"]["totals"]["calls"]
    assert sum(s.state.requests for s in two_replicas) - calls_before == this_run


def test_ray_distill_writes_the_labels_of_a_local_run(
    ray_instance, two_replicas, dl19_5q, tmp_path
):
    urls = [s.base_url for s in two_replicas]
    outs = {}
    for name, more in (("local", []), ("ray", ["--ray", "auto"])):
        out = tmp_path / name
        args = ["distill", "--input", str(dl19_5q / "candidates.jsonl"), "--out", str(out)]
        args += ["-q", "--no-cache", "--model", MODEL, "--window-size", "10", "--step", "5"]
        for url in urls:
            args += ["--base-url", url]
        assert main(args + more) == 0
        outs[name] = out
    labels = sorted(p.name for p in outs["local"].glob("*.jsonl"))
    assert labels
    for name in labels:
        assert (outs["ray"] / name).read_bytes() == (outs["local"] / name).read_bytes(), name
    manifest = json.loads((outs["ray"] / "manifest.json").read_text())
    assert manifest["parameters"]["executor"]["name"] == "ray"


def test_rerank_dataset(ray_instance, two_replicas, dl19_5q):
    from permrank import Reranker
    from permrank.distributed import rerank_dataset
    from permrank.runs.io import read_requests

    urls = [s.base_url for s in two_replicas]
    records = [json.loads(line) for line in (dl19_5q / "candidates.jsonl").open()]
    ds = ray.data.from_items(records)
    options = {"model": MODEL, "base_url": urls, "window_size": 10, "step": 5, "cache": None}
    rows = rerank_dataset(ds, actors=1, block_size=2, **options).take_all()
    with Reranker(**options) as reranker:
        expected = reranker.rerank_batch(list(read_requests(dl19_5q / "candidates.jsonl")))
    by_qid = {row["qid"]: row for row in rows}
    assert sorted(by_qid) == sorted(r.query.qid for r in expected)
    for ranking in expected:
        row = by_qid[ranking.query.qid]
        assert [c["docid"] for c in row["candidates"]] == ranking.docids
        assert row["error"] is None


@pytest.mark.slow
def test_a_killed_worker_loses_no_query_and_repeats_none(ray_instance, tmp_path):
    sims = replicas_of(DL19, 2, 0.05)
    try:
        urls = [s.base_url for s in sims]
        source = DL19 / "candidates.jsonl"
        reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
        assert main(rerank_args(source, reference, urls)) == 0
        more = ("--ray", "auto", "--ray-block-size", "3", "--concurrency", "4")
        result: list[int] = []
        run = threading.Thread(
            target=lambda: result.append(main(rerank_args(source, out, urls, *more)))
        )
        run.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and run.is_alive():
            workers = ray_workers()
            done = out.read_text().count("\n") if out.exists() else 0
            if len(workers) == 2 and done >= 3:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        run.join(timeout=300)
        assert killed is not None, "the run ended before a worker could be killed"
        assert result == [0]
        qids = [json.loads(line)["qid"] for line in out.read_text().splitlines()]
        assert len(qids) == len(set(qids)) == 43
        assert out.read_bytes() == reference.read_bytes()
        manifest = json.loads(Path(f"{out}.manifest.json").read_text())
        assert killed in manifest["parameters"]["executor"]["worker_pids"]
    finally:
        for sim in sims:
            sim.stop()


@pytest.mark.slow
def test_ray_local_starts_and_stops_its_own_instance(two_replicas, dl19_5q, tmp_path):
    """``--ray local`` from a fresh process (as a user runs it): its own Ray, gone after."""
    urls = [s.base_url for s in two_replicas]
    source = dl19_5q / "candidates.jsonl"
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert main(rerank_args(source, reference, urls)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "permrank", *rerank_args(source, out, urls, "--ray", "local")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes() == reference.read_bytes()
    executor = json.loads(Path(f"{out}.manifest.json").read_text())["parameters"]["executor"]
    assert executor["name"] == "ray" and executor["workers"] == 2
    for pid in executor["worker_pids"]:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"ray::" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )


def test_ray_flags_are_refused_before_any_model_call(dl19_5q, tmp_path, capsys):
    base = ["rerank", "--input", str(dl19_5q / "candidates.jsonl"), "-q"]
    base += ["--output", str(tmp_path / "out.jsonl")]
    assert main([*base, "--ray", "auto"]) == 2
    assert "--ray needs --base-url or --endpoints" in capsys.readouterr().err
    assert (
        main([*base, "--ray", "auto", "--base-url", "http://127.0.0.1:9/v1", "--ray-actors", "0"])
        == 2
    )
    assert "--ray-actors must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
