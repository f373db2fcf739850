"""Shared by the reliability tests: a simulator on the DL19 fixture and a CLI runner."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from permrank.cli.main import main
from permrank.sim.server import Corpus, Simulator

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "dl19-5q"
CANDIDATES = FIXTURE / "candidates.jsonl"
QRELS = FIXTURE / "qrels.txt"
SENTINEL_KEY = "sk-SENTINEL-4f1c9e27d0b84a53"


def fixture_corpus() -> Corpus:
    return Corpus.from_files(CANDIDATES, QRELS)


@contextmanager
def simulator(corpus: Corpus | None = None, **options: Any) -> Iterator[Simulator]:
    with Simulator(corpus or fixture_corpus(), **options) as sim:
        yield sim


class Recorder:
    """A simulator hook that keeps every completion request body it sees (answers nothing)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def intercept(self, handler: Any, body: dict[str, Any], path: str) -> bool:
        with self.lock:
            self.bodies.append(body)
        return False

    def describe(self) -> dict[str, Any]:
        return {"recorded": len(self.bodies)}


@contextmanager
def recorded_simulator() -> Iterator[Simulator]:
    """The fixture simulator with a ``Recorder`` of every completion request, as ``.recorder``."""
    recorder = Recorder()
    with simulator(fixture_corpus(), faults=recorder) as running:
        running.recorder = recorder  # type: ignore[attr-defined]
        yield running


def rerank_argv(
    sim: Simulator,
    input_path: Path | str,
    output: Path | str,
    cache: Path | str | None,
    *extra: str,
) -> list[str]:
    """``permrank rerank`` against ``sim``; ``cache`` None leaves the cache flags out."""
    cache_flags = ["--cache", str(cache)] if cache is not None else []
    return [
        "rerank",
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--base-url",
        sim.base_url,
        "--model",
        sim.state.model,
        *cache_flags,
        "--quiet",
        *extra,
    ]


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """Run ``permrank`` in this process: (exit code, stdout, stderr)."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def fixture_records(limit: int | None = None, depth: int | None = None) -> list[dict[str, Any]]:
    records = read_jsonl(CANDIDATES)[:limit]
    for r in records:
        r["candidates"] = r["candidates"][:depth]
    return records


def docids_by_qid(path: Path | str) -> dict[str, list[str]]:
    return {r["qid"]: [c["docid"] for c in r["candidates"]] for r in read_jsonl(path)}
