"""The sync API interrupted mid-batch (Ctrl-C, or a SIGTERM handler's SystemExit): the work on
its private event loop is cancelled before the interruption goes on, so nothing is retried or
sent after it and nothing is left pending for the interpreter to destroy noisily at exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from permrank.sim.server import Corpus, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"

SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from permrank import Reranker
    from permrank.runs.io import read_requests

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Reranker(model="sim", base_url=sys.argv[1], concurrency=2, max_retries=5) as reranker:
        reranker.rerank_batch(list(read_requests(sys.argv[2])))
    """
)
NOISE = (
    "Task was destroyed",
    "Exception ignored",
    "Unclosed client session",
    "retrying",
    "was created in a different Context",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "returncode"), [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, 143)]
)
def test_an_interrupted_batch_stops_its_requests_and_exits_quietly(tmp_path, signum, returncode):
    script = tmp_path / "batch.py"
    script.write_text(SCRIPT)
    corpus = Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")
    with Simulator(corpus, latency_s=0.5) as sim:
        proc = subprocess.Popen(
            [sys.executable, str(script), sim.base_url, str(DL19_5Q / "candidates.jsonl")],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while sim.state.requests < 2:  # two windows in flight, answers 0.5 s away
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        asked = sim.state.requests
        time.sleep(1.0)  # longer than the simulator's latency and the first retry's pause
        assert sim.state.requests == asked == 2, "a request was sent after the interruption"
    assert proc.returncode == returncode, err
    for noise in NOISE:
        assert noise not in err, err
