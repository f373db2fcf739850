"""Distillation labels: a teacher's rankings exported as training records, resumably.

A teacher (any Reranker) ranks each query, in its input order and in ``augment`` seeded shuffled
orders (permutation augmentation, as RankZephyr was trained). Each teacher run becomes records in
up to three formats:

- ``listwise``: the query, its candidates in teacher order, the order the teacher was shown, and
  every window the teacher was asked with its local permutation (from ``Ranking.trace``);
- ``pairwise``: (query, pos, neg, rank gap) pairs, ``pos`` ranked above ``neg`` by the teacher,
  sampled by rules (``top``: all pairs among the top m; ``adjacent``: neighbours in the teacher
  order; ``random``: each of the top m against seeded random candidates below rank r);
- ``grouped``: ``{"query", "pos": [...], "neg": [...]}``, the JSONL layout FlagEmbedding's
  reranker trainer reads (``pos``/``neg`` are lists of passage texts: the teacher's top P, and N
  negatives drawn from below them); optionally ``pos_scores``/``neg_scores`` (scores from the
  teacher's ranks, for its knowledge-distillation mode) and ``prompt``.

Records go to sharded JSONL files (``listwise-00000.jsonl``, ...) of at most ``shard_size``
records. A query's records are appended, flushed and synced, and only then is the query
committed to a journal (``done.jsonl``: one line a query, with the end position of every shard).
A run that is killed resumes from the last committed query: the shards are cut back to the
journal's positions, so no record is written twice and none is lost. ``stats.json`` is summed
from the journal, so its counts are those of the records on disk.

Everything here is pure except ``LabelStore`` (the output folder).

Why one module of ~590 lines: the label options, the three record formats and the resumable
store share one journal format and are read together; split, each part would import the others.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permrank.core import scores
from permrank.core.errors import ConfigError, InputError
from permrank.core.files import write_json_atomic

if TYPE_CHECKING:  # annotations only: the CLI reads FORMATS etc. without pydantic
    from permrank.core.types import Ranking, Request

log = logging.getLogger(__name__)

FORMATS = ("listwise", "pairwise", "grouped")
PAIR_RULES = ("top", "adjacent", "random")
JOURNAL = "done.jsonl"
CONFIG = "config.json"
STATS = "stats.json"


@dataclass(frozen=True)
class PairSampling:
    """Which (pos, neg) pairs are taken from a teacher order (ranks are 1-based)."""

    rules: tuple[str, ...] = ("top",)
    top: int = 10
    """m: ``top`` takes every pair among the first m; ``random`` pairs each of them."""
    below: int = 20
    """r: ``random`` draws its negatives from the candidates ranked below r."""
    samples: int = 5
    """Negatives drawn for each of the top m by ``random``."""

    def check(self) -> None:
        unknown = [r for r in self.rules if r not in PAIR_RULES]
        if unknown or not self.rules:
            raise ConfigError(
                f"unknown pair rule(s) {', '.join(unknown) or '(none given)'}; "
                f"choose among: {', '.join(PAIR_RULES)}"
            )
        if self.top < 1 or self.below < 1 or self.samples < 1:
            raise ConfigError(
                f"pair sampling needs --pair-top, --pair-below and --pair-samples >= 1 "
                f"(got {self.top}, {self.below}, {self.samples})"
            )


@dataclass(frozen=True)
class GroupSampling:
    """How one (query, positives, hard negatives) group is cut from a teacher order."""

    positives: int = 1
    """The teacher's first P candidates are the positives."""
    negatives: int = 15
    """At most N negatives, drawn (seeded) from the candidates ranked below ``negatives_below``."""
    negatives_below: int | None = None
    """Negatives come from ranks below this one (default: right after the positives)."""
    prompt: str | None = None
    """FlagEmbedding's optional ``prompt`` field (LLM rerankers), written when given."""
    scores: bool = False
    """Also write ``pos_scores``/``neg_scores`` (from teacher ranks), for FlagEmbedding's
    knowledge-distillation mode."""

    def check(self) -> None:
        if self.positives < 1 or self.negatives < 1:
            raise ConfigError(
                f"--group-positives and --group-negatives must be >= 1 "
                f"(got {self.positives}, {self.negatives})"
            )
        if self.negatives_below is not None and self.negatives_below < self.positives:
            raise ConfigError(
                f"--group-negatives-below ({self.negatives_below}) must be at least "
                f"--group-positives ({self.positives}): a negative cannot rank above a positive"
            )


@dataclass(frozen=True)
class LabelOptions:
    """Everything that decides which records are written (the teacher aside)."""

    formats: tuple[str, ...] = FORMATS
    shard_size: int = 10_000
    augment: int = 0
    """Permutation augmentation: extra teacher runs per query, each on a seeded shuffle of the
    input order (``--augment``; ``shuffles`` is its older name, still taken and read)."""
    seed: int = 0
    """Seeds the shuffles and the sampling (per query and run, so a resumed run draws the same)."""
    pairs: PairSampling = field(default_factory=PairSampling)
    groups: GroupSampling = field(default_factory=GroupSampling)
    shuffles: InitVar[int | None] = None

    def __post_init__(self, shuffles: int | None) -> None:
        if shuffles is not None:
            if self.augment and self.augment != shuffles:
                raise ConfigError(f"augment={self.augment} and shuffles={shuffles}: give one")
            object.__setattr__(self, "augment", shuffles)

    def check(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConfigError(
                f"unknown format(s) {', '.join(unknown) or '(none given)'}; "
                f"choose among: {', '.join(FORMATS)}"
            )
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1 record (got {self.shard_size})")
        if self.augment < 0:
            raise ConfigError(f"--augment must be >= 0 (got {self.augment})")
        self.pairs.check()
        self.groups.check()

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["formats"] = list(self.formats)
        data["pairs"]["rules"] = list(self.pairs.rules)
        return data


# ``options.shuffles`` reads ``augment`` (set after the dataclass is made: the ``shuffles=``
# keyword of its __init__ is the InitVar above, whose default the dataclass has taken already).
LabelOptions.shuffles = property(lambda self: self.augment)  # type: ignore[attr-defined]


# -- teacher runs ---------------------------------------------------------------------------


def teacher_requests(
    request: Request, augment: int = 0, seed: int = 0, *, shuffles: int | None = None
) -> list[Request]:
    """The input order, then ``augment`` seeded shuffles of it (run 0, 1, ..., K);
    ``shuffles=`` is the older name of ``augment``."""
    augment = shuffles if shuffles is not None else augment
    runs = [request]
    for run in range(1, augment + 1):
        candidates = list(request.candidates)
        random.Random(f"{seed}:shuffle:{request.query.qid}:{run}").shuffle(candidates)
        runs.append(request.model_copy(update={"candidates": candidates}))
    return runs


def _rng(seed: int, purpose: str, qid: str, run: int) -> random.Random:
    return random.Random(f"{seed}:{purpose}:{qid}:{run}")


# -- records (pure) -------------------------------------------------------------------------


def listwise_record(ranking: Ranking, run: int, shown: Sequence[str]) -> dict[str, Any]:
    """The teacher's full order and every window it was asked, with its local permutation."""
    return {
        "qid": ranking.query.qid,
        "query": ranking.query.text,
        "run": run,
        "input_order": list(shown),
        "candidates": [c.model_dump(exclude_none=True) for c in ranking.candidates],
        "windows": [
            {
                "round": t.round,
                "docids": t.docids,
                "permutation": t.permutation,
                "order": [t.docids[p] for p in t.permutation],
                "answer": t.answer,
                "repairs": t.repair.kinds(),
            }
            for t in ranking.trace
        ],
    }


def sample_pairs(n: int, sampling: PairSampling, rng: random.Random) -> list[tuple[int, int]]:
    """(better, worse) pairs of 0-based teacher ranks, each pair once, in the rules' order."""
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()

    def take(i: int, j: int) -> None:
        if (i, j) not in seen:
            seen.add((i, j))
            pairs.append((i, j))

    top = min(sampling.top, n)
    for rule in sampling.rules:
        if rule == "top":
            for i in range(top):
                for j in range(i + 1, top):
                    take(i, j)
        elif rule == "adjacent":
            for i in range(n - 1):
                take(i, i + 1)
        elif rule == "random":
            below = list(range(sampling.below, n))
            for i in range(top):
                pool = [j for j in below if j > i]
                for j in sorted(rng.sample(pool, min(sampling.samples, len(pool)))):
                    take(i, j)
    return pairs


def pairwise_records(
    ranking: Ranking, run: int, sampling: PairSampling, rng: random.Random
) -> list[dict[str, Any]]:
    records = []
    candidates = ranking.candidates
    for i, j in sample_pairs(len(candidates), sampling, rng):
        pos, neg = candidates[i], candidates[j]
        records.append(
            {
                "qid": ranking.query.qid,
                "query": ranking.query.text,
                "run": run,
                "pos": pos.text,
                "neg": neg.text,
                "pos_docid": pos.docid,
                "neg_docid": neg.docid,
                "pos_rank": i + 1,
                "neg_rank": j + 1,
                "rank_gap": j - i,
            }
        )
    return records


def rank_score(rank: int, n: int) -> float:
    """A teacher score from a 1-based rank: n for the first, 1 for the last (higher is better;
    ``permrank.core.scores``)."""
    return scores.rank_score(rank - 1, n)


def group_ranks(n: int, sampling: GroupSampling, rng: random.Random) -> tuple[list[int], list[int]]:
    """0-based teacher ranks of the positives and of the sampled negatives (both sorted)."""
    positives = list(range(min(sampling.positives, n)))
    start = max(sampling.negatives_below or 0, len(positives))
    pool = list(range(start, n))
    negatives = sorted(rng.sample(pool, min(sampling.negatives, len(pool))))
    return positives, negatives


def grouped_record(
    ranking: Ranking, positives: Sequence[int], negatives: Sequence[int], sampling: GroupSampling
) -> dict[str, Any]:
    """One FlagEmbedding group from 0-based teacher ranks of positives and negatives."""
    n = len(ranking.candidates)
    record: dict[str, Any] = {
        "query": ranking.query.text,
        "pos": [ranking.candidates[i].text for i in positives],
        "neg": [ranking.candidates[i].text for i in negatives],
    }
    if sampling.scores:
        record["pos_scores"] = [rank_score(i + 1, n) for i in positives]
        record["neg_scores"] = [rank_score(i + 1, n) for i in negatives]
    if sampling.prompt is not None:
        record["prompt"] = sampling.prompt
    return record


@dataclass
class Agreement:
    """Pairs whose two passages have different qrels grades, and how many the teacher got right."""

    judged: int = 0
    agreeing: int = 0

    def add_pair(self, grades: dict[str, int], better: str, worse: str) -> None:
        if better in grades and worse in grades and grades[better] != grades[worse]:
            self.judged += 1
            self.agreeing += grades[better] > grades[worse]


@dataclass
class QueryLabels:
    """Every record of one query (all its teacher runs), and what they count."""

    qid: str
    records: dict[str, list[dict[str, Any]]]
    runs: int
    windows: int
    pair_agreement: Agreement | None
    group_agreement: Agreement | None

    def counts(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "qid": self.qid,
            "runs": self.runs,
            "windows": self.windows,
            "records": {f: len(r) for f, r in self.records.items()},
        }
        if self.pair_agreement is not None and self.group_agreement is not None:
            entry["agreement"] = {
                "pairs": asdict(self.pair_agreement),
                "groups": asdict(self.group_agreement),
            }
        return entry


def query_labels(
    runs: Sequence[Ranking],
    shown: Sequence[Sequence[str]],
    options: LabelOptions,
    grades: dict[str, int] | None = None,
) -> QueryLabels:
    """The records of one query from its teacher runs (run 0 = input order)."""
    qid = runs[0].query.qid
    records: dict[str, list[dict[str, Any]]] = {f: [] for f in options.formats}
    pair_agreement = Agreement() if grades is not None else None
    group_agreement = Agreement() if grades is not None else None
    for run, (ranking, order) in enumerate(zip(runs, shown, strict=True)):
        if "listwise" in records:
            records["listwise"].append(listwise_record(ranking, run, order))
        if "pairwise" in records:
            pairs = pairwise_records(
                ranking, run, options.pairs, _rng(options.seed, "pairs", qid, run)
            )
            records["pairwise"].extend(pairs)
            if pair_agreement is not None and grades is not None:
                for p in pairs:
                    pair_agreement.add_pair(grades, p["pos_docid"], p["neg_docid"])
        if "grouped" in records:
            rng = _rng(options.seed, "groups", qid, run)
            positives, negatives = group_ranks(len(ranking.candidates), options.groups, rng)
            if positives and negatives:  # FlagEmbedding needs at least one of each
                records["grouped"].append(
                    grouped_record(ranking, positives, negatives, options.groups)
                )
                if group_agreement is not None and grades is not None:
                    for i in positives:
                        for j in negatives:
                            group_agreement.add_pair(
                                grades, ranking.candidates[i].docid, ranking.candidates[j].docid
                            )
    return QueryLabels(
        qid=qid,
        records=records,
        runs=len(runs),
        windows=sum(len(r.trace) for r in runs),
        pair_agreement=pair_agreement,
        group_agreement=group_agreement,
    )


# -- the output folder ------------------------------------------------------------------------


def shard_name(fmt: str, index: int) -> str:
    return f"{fmt}-{index:05d}.jsonl"


@dataclass
class ShardPosition:
    """Where a format's committed records end: shard index, records in it, byte offset."""

    shard: int = 0
    records: int = 0
    offset: int = 0


class LabelStore:
    """The output folder: sharded JSONL per format, a commit journal, a config and stats.

    ``LabelStore.open(out, options)`` creates the folder or resumes it (refusing other options
    than those it was started with), cutting any record written after the last commit.
    """

    def __init__(self, out: Path, options: LabelOptions, entries: list[dict[str, Any]]):
        self.out = out
        self.options = options
        self.entries = entries
        self.done: set[str] = {e["qid"] for e in entries}
        last = entries[-1]["positions"] if entries else {}
        self.positions = {
            f: ShardPosition(*last[f]) if f in last else ShardPosition() for f in options.formats
        }
        self._journal = open(out / JOURNAL, "a", encoding="utf-8")

    @classmethod
    def open(cls, out: str | Path, options: LabelOptions) -> LabelStore:
        options.check()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / CONFIG
        wanted = options.describe()
        if config_path.exists():
            try:
                found = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise InputError(
                    "is not valid JSON: remove the folder to start afresh", path=str(config_path)
                ) from None
            if "shuffles" in found and "augment" not in found:  # written before the rename
                found["augment"] = found.pop("shuffles")
            if found != wanted:
                changed = sorted(k for k in wanted if found.get(k) != wanted[k])
                raise ConfigError(
                    f"{out} holds labels made with other options ({', '.join(changed)} differ): "
                    "resume with the same options, or give a new --out"
                )
        else:
            write_json_atomic(config_path, wanted)
        entries = read_journal(out / JOURNAL)
        store = cls(out, options, entries)
        store._cut_back()
        if entries:
            log.info("resuming %s: %d queries already done", out, len(entries))
        return store

    def _cut_back(self) -> None:
        """Remove whatever was written after the last commit (a killed run's partial query)."""
        for fmt, pos in self.positions.items():
            for path in self.out.glob(f"{fmt}-*.jsonl"):
                index = _shard_index(path.name, fmt)
                if index is None:
                    continue
                if index > pos.shard:
                    path.unlink()
                elif index == pos.shard and path.stat().st_size > pos.offset:
                    log.info("cutting %s back to %d bytes (uncommitted records)", path, pos.offset)
                    with open(path, "r+b") as f:
                        f.truncate(pos.offset)

    def commit(self, labels: QueryLabels) -> None:
        """Append one query's records, sync them, then journal the query as done."""
        if labels.qid in self.done:
            raise ConfigError(f"query {labels.qid} is already in {self.out}: not written twice")
        for fmt in self.options.formats:
            self._append(fmt, labels.records.get(fmt, []))
        entry = labels.counts()
        entry["positions"] = {f: [p.shard, p.records, p.offset] for f, p in self.positions.items()}
        self._journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.entries.append(entry)
        self.done.add(labels.qid)

    def _append(self, fmt: str, records: Sequence[dict[str, Any]]) -> None:
        pos = self.positions[fmt]
        remaining = list(records)
        while remaining:
            if pos.records >= self.options.shard_size:
                pos.shard, pos.records, pos.offset = pos.shard + 1, 0, 0
            room = self.options.shard_size - pos.records
            chunk, remaining = remaining[:room], remaining[room:]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk).encode()
            with open(self.out / shard_name(fmt, pos.shard), "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            pos.records += len(chunk)
            pos.offset += len(data)

    def shards(self) -> dict[str, list[str]]:
        return {
            f: [
                shard_name(f, i)
                for i in range(p.shard + 1)
                if (self.out / shard_name(f, i)).exists()
            ]
            for f, p in self.positions.items()
        }

    def stats(
        self, *, input_queries: int | None = None, failed: Iterable[str] = ()
    ) -> dict[str, Any]:
        return summarize(self.entries, self.options, self.shards(), input_queries, list(failed))

    def write_stats(self, **kwargs: Any) -> dict[str, Any]:
        stats = self.stats(**kwargs)
        write_json_atomic(self.out / STATS, stats)
        return stats

    def close(self) -> None:
        self._journal.close()


def _shard_index(name: str, fmt: str) -> int | None:
    stem = name[len(fmt) + 1 : -len(".jsonl")]
    return int(stem) if stem.isdigit() else None


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The committed queries; a torn last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    entries: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - good)
        with open(path, "r+b") as f:
            f.truncate(good)
    return entries


def _share(agreement: dict[str, int]) -> float | None:
    return agreement["agreeing"] / agreement["judged"] if agreement["judged"] else None


def summarize(
    entries: Sequence[dict[str, Any]],
    options: LabelOptions,
    shards: dict[str, list[str]],
    input_queries: int | None = None,
    failed: Sequence[str] = (),
) -> dict[str, Any]:
    """The stats file: counts summed from the journal, so they match the records on disk."""
    records = {f: 0 for f in options.formats}
    pairs = {"judged": 0, "agreeing": 0}
    groups = {"judged": 0, "agreeing": 0}
    judged_queries = 0
    for entry in entries:
        for fmt, count in entry["records"].items():
            records[fmt] = records.get(fmt, 0) + count
        agreement = entry.get("agreement")
        if agreement:
            judged_queries += 1
            for key in ("judged", "agreeing"):
                pairs[key] += agreement["pairs"][key]
                groups[key] += agreement["groups"][key]
    stats: dict[str, Any] = {
        "queries": len(entries),
        "input_queries": input_queries,
        "complete": input_queries is not None and len(entries) == input_queries,
        "failed": list(failed),
        "teacher_runs": sum(e["runs"] for e in entries),
        "windows": sum(e["windows"] for e in entries),
        "records": records,
        "pairs": records.get("pairwise", 0),
        "groups": records.get("grouped", 0),
        "shards": shards,
        "options": options.describe(),
    }
    if judged_queries:
        stats["qrels_agreement"] = {
            "queries": judged_queries,
            **({"pairs": {**pairs, "share": _share(pairs)}} if "pairwise" in records else {}),
            **({"groups": {**groups, "share": _share(groups)}} if "grouped" in records else {}),
            "note": "among exported (better, worse) pairs whose two passages are both judged "
            "and have different grades: the share the teacher ordered as the qrels do "
            "(groups: every positive against every negative)",
        }
    return stats


def read_records(out: str | Path, fmt: str) -> list[dict[str, Any]]:
    """Every record of one format, shard by shard (for checks and small data)."""
    out = Path(out)
    paths = sorted(
        (p for p in out.glob(f"{fmt}-*.jsonl") if _shard_index(p.name, fmt) is not None),
        key=lambda p: _shard_index(p.name, fmt) or 0,
    )
    records: list[Any] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records
