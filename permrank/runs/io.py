"""Files in and out: JSONL requests (ours or rank_llm's layout, plain or .gz), reranked JSONL,
TREC run files.

Reading is streamed. ``validate_requests`` reads the whole input once before any model call and
refuses bad input with the file, the line and the field; ``read_requests`` then streams it.

Why ~440 lines: reading (two input layouts, with file:line errors) and crash-safe writing share
the record helpers (qid, docids) that resume depends on; keeping them together keeps the
formats in one place.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

from permrank.core.errors import InputError
from permrank.core.scores import rank_scores
from permrank.core.types import Candidate, Query, Ranking, Request

log = logging.getLogger(__name__)


def open_text(path: str | Path, mode: str = "r") -> IO[str]:
    """Open a text file, gzip-compressed when its name ends in .gz; UTF-8, strict."""
    path = str(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode.replace("t", "") + "b"), encoding="utf-8")  # type: ignore[type-var]
    return open(path, mode, encoding="utf-8")


def _text_of(doc: dict[str, Any]) -> Any:
    for key in ("text", "contents", "segment", "body"):
        if doc.get(key) is not None:
            return doc[key]
    return None


def parse_request(record: Any, *, path: str = "<input>", line: int | None = None) -> Request:
    """One JSON record in either layout -> Request. Raises InputError naming what is wrong."""

    def fail(message: str) -> InputError:
        return InputError(message, path=path, line=line)

    if not isinstance(record, dict):
        raise fail(
            f"expected a JSON object per line, got {type(record).__name__}: write each query as "
            '{"qid": ..., "query": ..., "candidates": [...]}'
        )
    extras = {k: v for k, v in record.items() if k not in ("qid", "query", "candidates")}
    raw_query = record.get("query")
    layout: Literal["permrank", "rank_llm"]
    if isinstance(raw_query, dict):  # rank_llm's Request layout
        layout = "rank_llm"
        qid, text = raw_query.get("qid"), raw_query.get("text")
        query_extra = {k: v for k, v in raw_query.items() if k not in ("qid", "text")}
        qfield = "query.qid"
    else:
        layout = "permrank"
        qid, text = record.get("qid"), raw_query
        query_extra = extras  # ranking_record writes a query's extras back at the top level
        extras = {}
        qfield = "qid"
    if qid is None or (isinstance(qid, str) and not qid.strip()):
        raise fail(f"field {qfield!r} is missing: every query needs an id")
    if not isinstance(text, str) or not text.strip():
        field = "query.text" if layout == "rank_llm" else "query"
        raise fail(f"field {field!r} is missing or empty: every query needs its text")
    raw_candidates = record.get("candidates")
    if not isinstance(raw_candidates, list):
        raise fail(
            "field 'candidates' is missing or not a list: give the query's candidates as a list "
            'of {"docid": ..., "text": ...} (an empty list is allowed)'
        )
    candidates: list[Candidate] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_candidates):
        where = f"candidates[{i}]"
        if not isinstance(raw, dict):
            raise fail(
                f'{where} is not an object: write each candidate as {{"docid": ..., "text": ...}}'
            )
        docid = raw.get("docid")
        if docid is None or str(docid) == "":
            raise fail(f"{where}.docid is missing: give every candidate an id (field 'docid')")
        docid = str(docid)
        if docid in seen:
            raise fail(
                f"{where}.docid {docid!r} repeats candidates[{seen[docid]}] in query {qid}: "
                "remove the duplicate (each candidate must be listed once)"
            )
        seen[docid] = i
        data = dict(raw)
        data["docid"] = docid
        if layout == "rank_llm":
            doc = raw.get("doc")
            if not isinstance(doc, dict):
                raise fail(f"{where}.doc is missing: rank_llm's layout keeps the text in 'doc'")
            body = _text_of(doc)
            if not isinstance(body, str):
                raise fail(
                    f"{where}.doc has no text: put the passage in 'text', 'contents' or 'segment'"
                )
            data["text"] = body
            data.setdefault("title", doc.get("title"))
        else:
            body = raw.get("text")
            if body is None:
                body = _text_of(raw)
            if not isinstance(body, str):
                raise fail(
                    f"{where}.text is missing or not a string (docid {docid}): give the passage "
                    "text as a string"
                )
            data["text"] = body
        if not data["text"].strip():
            raise fail(f"{where}.text is empty (docid {docid}): give the passage text")
        title = data.get("title")
        if title is not None and not isinstance(title, str):
            data["title"] = str(title)
        score = data.get("score")
        if score is not None and not isinstance(score, int | float):
            try:
                data["score"] = float(score)
            except (TypeError, ValueError):
                raise fail(
                    f"{where}.score {score!r} is not a number: give a number or leave it out"
                ) from None
        candidates.append(Candidate(**data))
    return Request(
        query=Query(qid=str(qid), text=text, **query_extra),
        candidates=candidates,
        layout=layout,
        **extras,
    )


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    # Bytes decoded line by line, so a bad byte is reported on its own line (a text wrapper
    # decodes ahead, in chunks, and would blame an earlier line).
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(
                        f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line): "
                        "convert the file to UTF-8",
                        path=str(path),
                        line=lineno,
                    ) from None
                yield lineno, line
    except FileNotFoundError:
        raise InputError("no such file: check the path", path=path) from None
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read ({exc})", path=path) from None


def _numbered_requests(path: str | Path) -> Iterator[tuple[int, Request]]:
    """Each request of a JSONL file with its line number; blank lines skipped."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if looks_like_trec_run(line):
                raise InputError(
                    "this looks like a TREC run line (qid Q0 docid rank score tag), but --input "
                    "must be JSONL with the texts: one query a line, "
                    '{"qid": ..., "query": "text", "candidates": [{"docid": ..., "text": ...}]}. '
                    "Convert the run by joining it with the queries' and passages' texts (e.g. "
                    "from ir_datasets or your corpus), keeping each query's candidates in run "
                    "order; rank_llm's Request layout is read too",
                    path=str(path),
                    line=lineno,
                ) from None
            raise InputError(
                f"malformed JSON ({exc.msg} at column {exc.colno}): fix or remove this line",
                path=str(path),
                line=lineno,
            ) from None
        yield lineno, parse_request(record, path=str(path), line=lineno)


def looks_like_trec_run(line: str) -> bool:
    """``qid Q0 docid rank score tag``: a TREC run line, not JSON."""
    fields = line.split()
    if len(fields) != 6 or fields[1].upper() not in ("Q0", "0"):
        return False
    try:
        int(fields[3])
        float(fields[4])
    except ValueError:
        return False
    return True


def read_requests(path: str | Path) -> Iterator[Request]:
    """Stream the requests of a JSONL file (either layout, plain or .gz)."""
    for _, request in _numbered_requests(path):
        yield request


def validate_requests(path: str | Path, limit: int | None = None) -> tuple[int, int]:
    """Read every request once (the first ``limit`` ones if given); refuse bad input before any
    model call.

    Returns (queries, candidates). Duplicate qids are refused; an empty candidate list is
    allowed (passed through unchanged) with a warning.
    """
    first_line: dict[str, int] = {}
    queries = candidates = 0
    for lineno, request in itertools.islice(_numbered_requests(path), limit):
        qid = request.query.qid
        if qid in first_line:
            raise InputError(
                f"qid {qid!r} repeats line {first_line[qid]}: each query must appear once "
                "(merge its candidates into one line)",
                path=str(path),
                line=lineno,
            )
        first_line[qid] = lineno
        if not request.candidates:
            log.warning(
                "%s:%d: query %s has no candidates; passed through unchanged", path, lineno, qid
            )
        queries += 1
        candidates += len(request.candidates)
    return queries, candidates


def requests_from_records(records: Iterable[dict[str, Any]]) -> list[Request]:
    return [parse_request(r, line=i) for i, r in enumerate(records, 1)]


def ranking_record(ranking: Ranking) -> dict[str, Any]:
    """A Ranking as a JSON record in the layout its request was read in."""
    scores = rank_scores(len(ranking.candidates))  # what Ranking's candidates carry too
    candidates = []
    for candidate, score in zip(ranking.candidates, scores, strict=True):
        data = candidate.model_dump()
        data["score"] = score
        data.pop("first_stage_score", None)  # Python's view of the input's score, not output
        if ranking.layout == "rank_llm":  # the text lives in "doc", as it was read
            data.pop("text", None)
            doc = data.get("doc") if isinstance(data.get("doc"), dict) else None
            doc = doc or {}
            if data.get("title") is None or data.get("title") == doc.get("title"):
                data.pop("title", None)
        candidates.append(data)
    query_extra = {k: v for k, v in ranking.query.model_dump().items() if k not in ("qid", "text")}
    if ranking.layout == "rank_llm":
        record: dict[str, Any] = {
            "query": {"text": ranking.query.text, "qid": ranking.query.qid, **query_extra},
            "candidates": candidates,
        }
    else:
        record = {
            "qid": ranking.query.qid,
            "query": ranking.query.text,
            **query_extra,
            "candidates": candidates,
        }
    if ranking.error:
        record["error"] = ranking.error
    return record


def ranking_line(ranking: Ranking) -> str:
    return json.dumps(ranking_record(ranking), ensure_ascii=False) + "\n"


def trec_lines(ranking: Ranking, tag: str = "permrank") -> str:
    return trec_lines_of(ranking.query.qid, ranking.docids, tag)


def trec_lines_of(qid: str, docids: list[str], tag: str = "permrank") -> str:
    scores = rank_scores(len(docids))
    return "".join(
        f"{qid} Q0 {docid} {rank} {score:g} {tag}\n"
        for rank, (docid, score) in enumerate(zip(docids, scores, strict=True), 1)
    )


def write_jsonl(path: str | Path, rankings: Iterable[Ranking]) -> None:
    with open_text(path, "w") as f:
        for ranking in rankings:
            f.write(ranking_line(ranking))


def write_trec(path: str | Path, rankings: Iterable[Ranking], tag: str = "permrank") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ranking in rankings:
            f.write(trec_lines(ranking, tag))


# -- crash-safe output -----------------------------------------------------------------------
# The reranked JSONL is written one finished query at a time: one write of the whole line (a
# gzip member of its own for .gz), then fsync. A run killed at any moment leaves complete lines
# and at most one partial line at the end, which ``recover_output`` removes before a resumed run
# appends to the file.


def record_qid(record: dict[str, Any]) -> str | None:
    """The qid of an output record in either layout."""
    query = record.get("query")
    qid = query.get("qid") if isinstance(query, dict) else record.get("qid")
    return None if qid is None else str(qid)


def record_docids(record: dict[str, Any]) -> list[str]:
    return [str(c.get("docid")) for c in record.get("candidates") or []]


def _complete_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """(line, end offset) of each complete line; for .gz, up to the first damaged member."""
    if str(path).endswith(".gz"):
        with gzip.open(path, "rb") as f:
            try:
                for line in f:
                    if line.endswith(b"\n"):
                        yield line, -1
            except (EOFError, OSError, zlib.error):  # a member cut by a crash
                return
        return
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield line, offset


def iter_output_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete records of an output file written by ``OutputWriter``."""
    for line, _ in _complete_lines(Path(path)):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and record_qid(record) is not None:
            yield record


def recover_output(path: str | Path) -> tuple[set[str], int]:
    """Make an output left by a killed run fit to append to; the qids it holds.

    Removes a partial last line, any line that is not a complete record, and the records of
    queries that failed (``"error"``), so a resumed run asks those again. Returns the qids kept
    and how many lines were removed. Streams: memory holds only the qids.
    """
    path = Path(path)
    done: set[str] = set()
    dropped = 0
    end = 0
    rewrite = False
    for line, offset in _complete_lines(path):
        try:
            record = json.loads(line)
            qid = record_qid(record) if isinstance(record, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            qid = None
        if qid is None or qid in done or record.get("error"):
            dropped += 1
            rewrite = True
            continue
        done.add(qid)
        end = offset
    gz = str(path).endswith(".gz")
    size = path.stat().st_size
    if not rewrite and not gz and end < size:  # only a partial last line: cut it off
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        return done, dropped + 1
    if rewrite or gz:
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        kept: set[str] = set()
        with OutputWriter(tmp, overwrite=True, gz=gz) as out:
            for line, _ in _complete_lines(path):
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                qid = record_qid(record) if isinstance(record, dict) else None
                if qid in done and qid not in kept and not record.get("error"):
                    kept.add(qid)
                    out.write(line.decode("utf-8"))
        os.replace(tmp, path)
    return done, dropped


class OutputWriter:
    """Append whole lines to a file, each one written at once and synced to disk."""

    def __init__(
        self,
        path: str | Path,
        *,
        overwrite: bool = False,
        sync: bool = True,
        gz: bool | None = None,
    ):
        self.path = Path(path)
        self.gz = str(path).endswith(".gz") if gz is None else gz
        self.sync = sync
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_APPEND)
        self.fd = os.open(self.path, flags, 0o644)

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        if self.gz:  # a gzip member per line: a crash can only damage the last one
            data = gzip.compress(data, mtime=0)
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        if self.sync:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
