"""Shared test fixtures: the fixture data folders and a simulator over dl19-5q."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from permrank.sim.server import Corpus, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"

# A shell without job control starts a background command (`bash .ci/run &`, `nohup ... &`)
# with SIGINT ignored, and an ignored signal stays ignored in every child it execs: the tests
# that press Ctrl-C on a child (SIGINT) would then see it ignored. Take SIGINT back here, so
# the children start with the default, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def dl19_5q() -> Path:
    return DL19_5Q


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    """A noiseless simulator answering for the five dl19-5q queries."""
    corpus = Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")
    with Simulator(corpus) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _own_response_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Each test gets an empty response cache (the CLI caches answers by default), so no test
    sees answers cached by another, or by a user's runs."""
    monkeypatch.setenv("PERMRANK_CACHE_DIR", str(tmp_path_factory.mktemp("permrank-cache")))
