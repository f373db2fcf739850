"""Metrics with ir-measures over TREC runs or permrank's JSONL output."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import ir_measures

from permrank.core.errors import ConfigError, InputError
from permrank.core.scores import rank_scores
from permrank.core.types import Ranking
from permrank.runs.io import _lines, parse_request

DEFAULT_METRICS = ("nDCG@10",)


def parse_metrics(names: Sequence[str]) -> list[ir_measures.Measure]:
    out = []
    for name in names:
        try:
            out.append(ir_measures.parse_measure(name))
        except Exception:  # noqa: BLE001 - ir-measures raises several types
            raise ConfigError(
                f"unknown metric {name!r}; examples: nDCG@10, P(rel=2)@10, AP(rel=2), R@100, RR"
            ) from None
    return out


def _refuse(message: str, path: str | Path, lineno: int) -> NoReturn:
    raise InputError(message, path=str(path), line=lineno)


def _number(
    cast: Callable[[str], Any], value: str, what: str, kind: str, path: str | Path, lineno: int
) -> Any:
    """``cast(value)``, or an InputError at ``path:lineno`` naming ``what`` is not ``kind``."""
    try:
        return cast(value)
    except ValueError:
        _refuse(f"{what} {value!r} is not {kind}", path, lineno)


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels (``qid iter docid rel``)."""
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            _refuse(
                f"a qrels line has 4 fields (qid 0 docid rel), this one has {len(parts)}",
                path,
                lineno,
            )
        rel = _number(int, parts[3], "relevance", "an integer", path, lineno)
        qrels.setdefault(parts[0], {})[parts[2]] = rel
    return qrels


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run, or a JSONL of requests/rankings (rank order gives the scores)."""
    run: dict[str, dict[str, float]] = {}
    for lineno, line in _lines(path):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("{"):
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"malformed JSON ({exc.msg})", path=str(path), line=lineno
                ) from None
            request = parse_request(record, path=str(path), line=lineno)
            docids = [c.docid for c in request.candidates]
            run[request.query.qid] = dict(zip(docids, rank_scores(len(docids)), strict=True))
            continue
        parts = stripped.split()
        if len(parts) < 6:
            _refuse(
                f"a TREC run line has 6 fields (qid Q0 docid rank score tag), this one has "
                f"{len(parts)}",
                path,
                lineno,
            )
        score = _number(float, parts[4], "score", "a number", path, lineno)
        run.setdefault(parts[0], {})[parts[2]] = score
    return run


def run_of(rankings: Iterable[Ranking]) -> dict[str, dict[str, float]]:
    run = {}
    for ranking in rankings:
        docids = [c.docid for c in ranking.candidates]
        run[ranking.query.qid] = dict(zip(docids, rank_scores(len(docids)), strict=True))
    return run


def evaluate(
    run: dict[str, dict[str, float]],
    qrels: dict[str, dict[str, int]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean of each metric over the queries of the run that have qrels."""
    measures = parse_metrics(metrics)
    judged = {q: docs for q, docs in run.items() if q in qrels}
    if not judged:
        raise InputError("no query of the run has qrels: check that the qids match")
    # Only the run's queries: a query of the qrels the run never saw is not a zero.
    values = ir_measures.calc_aggregate(measures, {q: qrels[q] for q in judged}, judged)
    return {str(m): float(values[m]) for m in measures}


def per_query(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], metric: str
) -> dict[str, float]:
    (measure,) = parse_metrics([metric])
    judged = {q: docs for q, docs in run.items() if q in qrels}
    judged_qrels = {q: qrels[q] for q in judged}
    return {
        m.query_id: float(m.value) for m in ir_measures.iter_calc([measure], judged_qrels, judged)
    }
