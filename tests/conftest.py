"""Shared test fixtures: the fixture data folders and a simulator over dl19-5q."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from permrank.simulator import Corpus, Simulator

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"


@pytest.fixture(scope="session")
def dl19_5q() -> Path:
    return DL19_5Q


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    """A noiseless simulator answering for the five dl19-5q queries."""
    corpus = Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")
    with Simulator(corpus) as sim:
        yield sim
