"""The response cache: a repeated run asks nothing and writes the same bytes; processes share it."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys

import pytest
from reliability_support import (
    CANDIDATES,
    ROOT,
    read_jsonl,
    rerank_argv,
    run_cli,
    simulator,
)

from permrank.backends.cache import CachingBackend, ResponseCache, cache_key, default_cache_path
from permrank.backends.openai import OpenAIBackend
from permrank.core.types import Completion

MESSAGES = [{"role": "user", "content": "rank [1] a [2] b"}]


def key(**changes: object) -> str:
    params: dict = dict(
        endpoint="http://127.0.0.1:1/v1",
        model="m",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0.0,
        seed=None,
        extra=None,
    )
    params.update(changes)
    endpoint, model, messages = params.pop("endpoint"), params.pop("model"), params.pop("messages")
    return cache_key(endpoint, model, messages, **params)


def test_key_changes_with_everything_that_decides_the_answer():
    base = key()
    assert key() == base
    variants = [
        key(model="other"),
        key(endpoint="http://127.0.0.1:2/v1"),
        key(messages=[{"role": "user", "content": "rank [1] a [2] c"}]),
        key(messages=[{"role": "system", "content": "rank [1] a [2] b"}]),
        key(max_tokens=11),
        key(temperature=0.7),
        key(seed=1),
        key(extra={"grammar": "root ::= x"}),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_cached_answer_keeps_its_token_counts_and_says_it_is_cached(tmp_path):
    with simulator() as sim:
        backend = CachingBackend(
            OpenAIBackend(sim.base_url, sim.state.model), tmp_path / "c.sqlite"
        )
        query = next(iter(sim.state.corpus.queries.values()))
        messages = [
            {"role": "user", "content": f"{query.text} [1] {query.passages[0][1]}"},
        ]

        async def twice() -> tuple[Completion, Completion]:
            first = await backend.complete(messages, max_tokens=20)
            second = await backend.complete(messages, max_tokens=20)
            await backend.aclose()
            return first, second

        first, second = asyncio.run(twice())
        assert sim.state.requests == 1
    assert not first.cached and second.cached
    assert second.text == first.text
    assert (second.prompt_tokens, second.completion_tokens) == (
        first.prompt_tokens,
        first.completion_tokens,
    )
    assert second.finish_reason == first.finish_reason
    assert backend.describe()["cache"] == str(tmp_path / "c.sqlite")


def test_an_answer_the_cache_cannot_keep_is_still_given_and_warned_about(tmp_path, caplog):
    """A commit that fails (a full disk, a file another process broke) happens after the answer
    was handed back: the run gets the answer and a warning naming the cache, not a failure."""
    with simulator() as sim:
        cache = ResponseCache(tmp_path / "c.sqlite")
        backend = CachingBackend(OpenAIBackend(sim.base_url, sim.state.model), cache)

        def full_disk(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        cache._put = full_disk  # type: ignore[method-assign]

        async def ask() -> Completion:
            try:
                return await backend.complete(MESSAGES, max_tokens=20)
            finally:
                await backend.aclose()  # waits for the queued commit

        answer = asyncio.run(ask())
    assert answer.text and not answer.cached
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("not kept in the cache" in m and "disk is full" in m for m in warned), warned
    assert str(tmp_path / "c.sqlite") in warned[-1]


def test_repeated_run_makes_no_call_and_writes_identical_bytes(tmp_path, capsys):
    cache = tmp_path / "cache.sqlite"
    with simulator() as sim:
        first = rerank_argv(sim, CANDIDATES, tmp_path / "a.jsonl", cache, "--trec", "a.trec")
        first[first.index("a.trec")] = str(tmp_path / "a.trec")
        assert run_cli(first, capsys)[0] == 0
        asked = sim.state.requests
        assert asked == 5 * 9  # 5 queries x 9 windows of 20 over 100 candidates
        second = rerank_argv(
            sim, CANDIDATES, tmp_path / "b.jsonl", cache, "--trec", str(tmp_path / "b.trec")
        )
        assert run_cli(second, capsys)[0] == 0
        assert sim.state.requests == asked  # not one more call
        # The same command again, told to start afresh: still no call, same bytes.
        assert run_cli(first + ["--overwrite"], capsys)[0] == 0
        assert sim.state.requests == asked
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.trec").read_bytes() == (tmp_path / "b.trec").read_bytes()
    manifest = json.loads((tmp_path / "b.jsonl.manifest.json").read_text())
    assert manifest["totals"]["calls"] == 0
    assert manifest["totals"]["cached_calls"] == 45
    first_manifest = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())
    # Cached answers carry the token counts of the calls that produced them.
    assert manifest["totals"]["prompt_tokens"] == first_manifest["totals"]["prompt_tokens"] > 0


def test_no_cache_asks_every_time_and_writes_no_cache_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PERMRANK_CACHE_DIR", str(tmp_path / "default"))
    with simulator() as sim:
        argv = rerank_argv(
            sim, CANDIDATES, tmp_path / "a.jsonl", None, "--no-cache", "--limit", "1"
        )
        assert run_cli(argv, capsys)[0] == 0
        assert run_cli(argv + ["--overwrite"], capsys)[0] == 0
        assert sim.state.requests == 2 * 9
    assert not (tmp_path / "default").exists()


def test_default_cache_location_follows_permrank_cache_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PERMRANK_CACHE_DIR", str(tmp_path / "default"))
    assert default_cache_path() == tmp_path / "default" / "cache.sqlite"
    with simulator() as sim:
        argv = rerank_argv(sim, CANDIDATES, tmp_path / "a.jsonl", None, "--limit", "1")
        assert run_cli(argv, capsys)[0] == 0
    assert len(ResponseCache(tmp_path / "default" / "cache.sqlite")) == 9
    manifest = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())
    assert manifest["parameters"]["backend"]["cache"] == str(tmp_path / "default" / "cache.sqlite")


def test_default_cache_location_without_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PERMRANK_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / ".cache" / "permrank" / "cache.sqlite"


def _hammer(path: str, worker: int, n: int) -> None:
    cache = ResponseCache(path)
    for i in range(n):
        shared = f"shared-{i}"  # every worker writes these: last one wins, none fails
        cache.put(shared, "m", Completion(text=f"{i}", prompt_tokens=i, completion_tokens=1))
        cache.put(f"w{worker}-{i}", "m", Completion(text=f"{worker}:{i}"))
        assert cache.get(shared) is not None
    cache.close()


def test_several_processes_share_one_cache_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_hammer, args=(path, w, 100)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    cache = ResponseCache(path)
    assert len(cache) == 100 + 4 * 100
    hit = cache.get("w3-99")
    assert hit is not None and hit.text == "3:99" and hit.cached
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.slow
def test_two_cli_runs_at_once_share_the_cache(tmp_path):
    cache = tmp_path / "cache.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with simulator(latency_s=0.01) as sim:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "permrank"]
                + rerank_argv(sim, CANDIDATES, tmp_path / f"{name}.jsonl", cache),
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in ("a", "b")
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        # Each window was asked at most twice (both runs may ask it before either stored it).
        assert 45 <= sim.state.requests <= 90
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")
    assert len(ResponseCache(cache)) == 45
