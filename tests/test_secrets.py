"""The API key never appears in anything permrank writes or prints, even when things fail."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    CANDIDATES,
    SENTINEL_KEY,
    read_jsonl,
    rerank_argv,
    run_cli,
    simulator,
)

from permrank.sim.faults import Faults


class KeyWatcher(Faults):
    """Faults that also check the key really reached the server, and can quote it back in an
    error, as careless servers do."""

    def __init__(self, quote_key: bool = False, **faults: Any):
        super().__init__(**faults)
        self.quote_key = quote_key
        self.authorizations: set[str] = set()

    def intercept(self, handler: Any, body: dict[str, Any], path: str) -> bool:
        authorization = handler.headers.get("Authorization", "")
        self.authorizations.add(authorization)
        if self.quote_key:
            message = f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}"
            handler._send(401, {"error": {"message": message, "type": "invalid_request_error"}})
            return True
        return super().intercept(handler, body, path)


@pytest.fixture
def sentinel(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL_KEY)
    caplog.set_level(logging.DEBUG)
    return SENTINEL_KEY


def assert_nowhere(key: str, folder: Path, *texts: str) -> None:
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert written, "nothing was written"
    for path in written:
        data = path.read_bytes()
        assert key.encode() not in data, f"the API key is in {path}"
        assert key[-12:].encode() not in data, f"part of the API key is in {path}"
    for text in texts:
        assert key not in text and key[-12:] not in text


def run(sim, tmp_path, capsys, *extra: str) -> tuple[int, str]:
    argv = rerank_argv(sim, CANDIDATES, tmp_path / "out.jsonl", tmp_path / "cache.sqlite")
    argv += ["--trec", str(tmp_path / "out.trec"), "--limit", "2", *extra]
    code, out, err = run_cli(["-vv", *argv], capsys)
    return code, out + err


def test_successful_run_writes_the_key_nowhere(sentinel, tmp_path, capsys, caplog):
    watcher = KeyWatcher()
    with simulator(faults=watcher) as sim:
        code, printed = run(sim, tmp_path, capsys)
        assert code == 0, printed
        code, again = run(sim, tmp_path, capsys, "--overwrite")  # from the cache
        assert code == 0, again
    assert watcher.authorizations == {f"Bearer {sentinel}"}  # the key was used...
    assert (tmp_path / "cache.sqlite").exists() and (tmp_path / "out.jsonl.manifest.json").exists()
    assert_nowhere(sentinel, tmp_path, printed, again, caplog.text)  # ...and kept nowhere


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_failures_write_the_key_nowhere(sentinel, tmp_path, capsys, caplog, on_error):
    watcher = KeyWatcher(fail_rate=1.0, status=503)
    with simulator(faults=watcher) as sim:
        code, printed = run(sim, tmp_path, capsys, "--on-error", on_error, "--max-retries", "1")
    assert code == (1 if on_error == "skip" else 2)
    assert "HTTP 503" in printed + caplog.text
    if on_error == "skip":
        assert all("error" in r for r in read_jsonl(tmp_path / "out.jsonl"))
    assert_nowhere(sentinel, tmp_path, printed, caplog.text)


def test_a_server_quoting_the_key_in_its_error_is_redacted(sentinel, tmp_path, capsys, caplog):
    watcher = KeyWatcher(quote_key=True)
    with simulator(faults=watcher) as sim:
        code, printed = run(sim, tmp_path, capsys, "--on-error", "skip")
    assert code == 1
    assert "Incorrect API key provided: [api key]" in printed + caplog.text
    records = read_jsonl(tmp_path / "out.jsonl")
    assert all("[api key]" in r["error"] for r in records)
    assert_nowhere(sentinel, tmp_path, printed, caplog.text)


def test_unreachable_endpoint_error_holds_no_key(sentinel, tmp_path, capsys, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with simulator() as sim:
        argv = rerank_argv(sim, CANDIDATES, tmp_path / "out.jsonl", tmp_path / "cache.sqlite")
    argv[argv.index("--base-url") + 1] = f"http://127.0.0.1:{port}/v1"
    code, out, err = run_cli(["-vv", *argv], capsys)
    assert code == 2 and "cannot reach the endpoint" in err
    (tmp_path / "marker").write_text("nothing else was written")
    assert_nowhere(sentinel, tmp_path, out, err, caplog.text)
