"""Several endpoints in one run: the pool backend, the probe of replicas, the CLI flags."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from permrank import Reranker
from permrank.backends.pool import PoolBackend, read_endpoints
from permrank.backends.probe import probe_replicas
from permrank.cli.main import main
from permrank.core.errors import BackendError, ConfigError, EndpointUnavailable
from permrank.runs.io import read_requests
from permrank.sim.server import Corpus, Simulator

MODEL = "permrank-simulator"


def corpus(dl19_5q: Path) -> Corpus:
    return Corpus.from_files(dl19_5q / "candidates.jsonl", dl19_5q / "qrels.txt")


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Simulator]]:
    """Three noisy simulators (same seeded noise: the same model) answering in 20 ms."""
    from permrank.sim.noise import parse_noise

    root = Path(__file__).resolve().parent.parent / "fixtures" / "dl19-5q"
    sims = [
        Simulator(corpus(root), noise=parse_noise("0.2", seed=3), latency_s=0.02).start()
        for _ in range(3)
    ]
    yield sims
    for sim in sims:
        sim.stop()


def dead_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def rankings_with(urls, dl19_5q: Path, **options) -> list[list[str]]:
    requests = list(read_requests(dl19_5q / "candidates.jsonl"))
    with Reranker(MODEL, urls, window_size=10, step=5, max_retries=2, **options) as reranker:
        return [r.docids for r in reranker.rerank_batch(requests)]


def test_pool_ranks_as_one_endpoint_and_shares_the_windows(replicas, dl19_5q):
    one = rankings_with(replicas[0].base_url, dl19_5q)
    before = [sim.state.requests for sim in replicas]
    requests = list(read_requests(dl19_5q / "candidates.jsonl"))
    with Reranker(MODEL, [s.base_url for s in replicas], window_size=10, step=5) as reranker:
        three = [r.docids for r in reranker.rerank_batch(requests)]
        described = reranker.backend.describe()
    assert three == one
    served = [sim.state.requests - b for sim, b in zip(replicas, before, strict=True)]
    total = sum(served)
    assert all(n >= total / 6 for n in served), served  # each a fair share (a third is 1/3)
    assert described["backend"] == "pool"
    assert [e["endpoint"] for e in described["endpoints"]] == [s.base_url for s in replicas]
    assert [e["calls"] for e in described["endpoints"]] == served
    assert all(e["prompt_tokens"] > 0 and e["seconds"] > 0 for e in described["endpoints"])
    assert described["resent"] == 0


def test_a_dead_endpoint_is_taken_out_and_its_windows_resent(replicas, dl19_5q):
    one = rankings_with(replicas[0].base_url, dl19_5q)
    dead = dead_url()
    requests = list(read_requests(dl19_5q / "candidates.jsonl"))
    urls = [dead, replicas[1].base_url]
    with Reranker(MODEL, urls, window_size=10, step=5, max_retries=3) as reranker:
        got = [r.docids for r in reranker.rerank_batch(requests)]
        described = reranker.backend.describe()
    assert got == one
    first, second = described["endpoints"]
    assert first["calls"] == 0 and first["failures"] >= 2
    assert first["times_out_of_rotation"] >= 1
    assert described["resent"] == first["failures"]
    assert second["calls"] > 0


def test_the_run_fails_only_when_no_endpoint_is_left(dl19_5q):
    # Every replica dead from the start: the probe says so before any request.
    with pytest.raises(EndpointUnavailable, match="cannot reach"):
        rankings_with([dead_url(), dead_url()], dl19_5q, on_error="fail")
    # Replicas that die later (no probe here): the run fails once no endpoint is left.
    from permrank.backends.pool import pool_backend

    requests = list(read_requests(dl19_5q / "candidates.jsonl"))
    pool = pool_backend([dead_url(), dead_url()], MODEL, max_retries=2)
    with Reranker(backend=pool, window_size=10, step=5, on_error="fail") as reranker:
        with pytest.raises(BackendError, match="no endpoint left"):
            reranker.rerank_batch(requests)


def test_an_endpoint_back_after_its_cooldown_is_used_again(replicas):
    import asyncio

    from permrank.backends.openai import OpenAIBackend

    backends = [OpenAIBackend(s.base_url, MODEL, max_retries=0) for s in replicas[:2]]
    pool = PoolBackend(backends, cooldown_s=60.0)
    clock = [0.0]
    pool._clock = lambda: clock[0]
    pool.members[0].down_until = 30.0  # out of rotation until t=30
    messages = [{"role": "user", "content": "hello"}]

    async def ask(n: int) -> None:
        for _ in range(n):
            await pool.complete(messages, max_tokens=5)
        await pool.aclose()

    asyncio.run(ask(3))
    assert [m.calls for m in pool.members] == [0, 3]
    clock[0] = 31.0
    asyncio.run(ask(2))
    assert pool.members[0].calls == 1  # back in rotation, sharing again


def test_probe_refuses_replicas_of_different_models(dl19_5q):
    with Simulator(corpus(dl19_5q)) as a, Simulator(corpus(dl19_5q)) as b:
        b.state.model = "another-model"
        with pytest.raises(EndpointUnavailable, match="different models"):
            probe_replicas([a.base_url, b.base_url])
        infos = probe_replicas([a.base_url, a.base_url + "/"])
        assert {i.model for i in infos} == {MODEL}


def test_endpoints_file(tmp_path):
    path = tmp_path / "endpoints.txt"
    path.write_text(
        "# two GPUs\nhttp://gpu1:8000/v1\nhttp://gpu2:8000/v1 2  # twice as fast\n\n",
        encoding="utf-8",
    )
    assert read_endpoints(path) == [("http://gpu1:8000/v1", 1.0), ("http://gpu2:8000/v1", 2.0)]
    path.write_text("http://gpu1:8000/v1\nhttp://gpu2:8000/v1 fast\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"endpoints.txt:2: weight"):
        read_endpoints(path)
    path.write_text("gpu1:8000\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r":1: .* not an http"):
        read_endpoints(path)


def test_weights_share_the_windows(replicas, dl19_5q):
    requests = list(read_requests(dl19_5q / "candidates.jsonl"))
    urls = [(replicas[0].base_url, 1.0), (replicas[1].base_url, 3.0)]
    with Reranker(MODEL, urls, window_size=10, step=5, concurrency=2) as reranker:
        reranker.rerank_batch(requests)
        calls = [e["calls"] for e in reranker.backend.describe()["endpoints"]]
    assert calls[1] > 1.5 * calls[0], calls


def test_cli_several_base_urls_and_an_endpoints_file(replicas, dl19_5q, tmp_path, capsys):
    common = ["rerank", "--input", str(dl19_5q / "candidates.jsonl"), "-q", "--no-cache"]
    common += ["--window-size", "10", "--step", "5", "--model", MODEL]
    single = tmp_path / "single.jsonl"
    assert main([*common, "--output", str(single), "--base-url", replicas[0].base_url]) == 0
    listed = tmp_path / "endpoints.txt"
    listed.write_text(f"{replicas[2].base_url} 1\n", encoding="utf-8")
    pooled = tmp_path / "pooled.jsonl"
    args = [*common, "--output", str(pooled), "--base-url", replicas[0].base_url]
    args += ["--base-url", replicas[1].base_url, "--endpoints", str(listed)]
    assert main(args) == 0
    assert pooled.read_bytes() == single.read_bytes()
    manifest = json.loads(Path(f"{pooled}.manifest.json").read_text())
    backend = manifest["parameters"]["backend"]
    assert [e["endpoint"] for e in backend["endpoints"]] == [s.base_url for s in replicas]
    assert all(e["calls"] > 0 for e in backend["endpoints"])
    assert sum(e["calls"] for e in backend["endpoints"]) == manifest["totals"]["calls"]
    assert len(manifest["parameters"]["endpoints"]) == 3  # each probed
    assert manifest["parameters"]["executor"] == {"name": "local"}


def test_cli_refuses_replicas_of_different_models(dl19_5q, tmp_path, capsys):
    with Simulator(corpus(dl19_5q)) as a, Simulator(corpus(dl19_5q)) as b:
        b.state.model = "another-model"
        code = main(
            [
                "rerank",
                "--input",
                str(dl19_5q / "candidates.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--base-url",
                a.base_url,
                "--base-url",
                b.base_url,
                "-q",
            ]
        )
    assert code != 0
    assert "different models" in capsys.readouterr().err
    assert a.state.requests == 0 and b.state.requests == 0


def test_scoring_methods_send_through_the_pool(dl19_5q):
    requests = list(read_requests(dl19_5q / "candidates.jsonl"))[:2]
    with Simulator(corpus(dl19_5q)) as a, Simulator(corpus(dl19_5q)) as b:
        options = {"method": "pointwise", "top_k": 20}
        with Reranker(MODEL, a.base_url, **options) as reranker:
            one = [r.docids for r in reranker.rerank_batch(requests)]
        with Reranker(MODEL, [a.base_url, b.base_url], **options) as reranker:
            two = [r.docids for r in reranker.rerank_batch(requests)]
            calls = [e["calls"] for e in reranker.backend.describe()["endpoints"]]
    assert two == one
    assert all(calls) and sum(calls) == 40  # 2 queries x 20 passages, one request each
