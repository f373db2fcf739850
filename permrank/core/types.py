"""Typed values at permrank's boundaries: queries, candidates, requests, rankings, usage.

These models import nothing else of permrank. Unknown fields on a candidate or a request are
kept (``extra="allow"``) and written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from permrank.core.scores import rank_scores

REPAIR_KINDS = (
    "ok",
    "wrong_format",
    "repetition",
    "missing",
    "out_of_range",
    "refusal",
    "echo",
    "format_example",
)
"""Every kind of repair a parsed window answer can need. ``ok`` means none was needed.
``echo`` (the window returned in the order it was shown) and ``format_example`` (the prompt's
format example copied, e.g. ``[] > []``) parse cleanly but are not rankings."""


class Query(BaseModel):
    model_config = ConfigDict(extra="allow")

    qid: str
    text: str


class Candidate(BaseModel):
    """One candidate. ``score`` is the first-stage score in a ``Request``; in a ``Ranking`` it
    is the rank-derived score the JSONL and TREC outputs write (n for the first of n, 1 for the
    last), and the first-stage score is kept in ``first_stage_score``."""

    model_config = ConfigDict(extra="allow")

    docid: str
    text: str
    title: str | None = None
    score: float | None = None
    first_stage_score: float | None = None
    """In a Ranking: the ``score`` the candidate came with (None when it had none)."""


class Request(BaseModel):
    """One query and its candidates, in first-stage order.

    ``layout`` records how the request was read ("permrank" or "rank_llm") so that it is written
    back in the same layout.
    """

    model_config = ConfigDict(extra="allow")

    query: Query
    candidates: list[Candidate]
    layout: Literal["permrank", "rank_llm"] = "permrank"


class RepairReport(BaseModel):
    """What parsing one window answer had to repair. ``ok`` is true when nothing was repaired."""

    ok: bool = True
    wrong_format: bool = False
    repetition: int = 0
    missing: int = 0
    out_of_range: int = 0
    refusal: bool = False
    echo: bool = False
    """The answer is the shown order (identity over 3 or more identifiers): not a ranking."""
    format_example: bool = False
    """The answer copies the prompt's format example (``[] > []``, ``[1] > [2]``)."""

    def kinds(self) -> list[str]:
        """The names of the repairs done (``["ok"]`` when none)."""
        if self.ok:
            return ["ok"]
        names = []
        if self.wrong_format:
            names.append("wrong_format")
        if self.repetition:
            names.append("repetition")
        if self.missing:
            names.append("missing")
        if self.out_of_range:
            names.append("out_of_range")
        if self.refusal:
            names.append("refusal")
        if self.echo:
            names.append("echo")
        if self.format_example:
            names.append("format_example")
        return names


class Usage(BaseModel):
    """What a run cost, counted from the server's answers (never estimated)."""

    model_config = ConfigDict(populate_by_name=True)

    calls: int = 0
    cached_calls: int = 0
    failed_queries: int = Field(
        default=0, validation_alias=AliasChoices("failed_queries", "failed_calls")
    )
    """Queries that failed for good (older manifests call it ``failed_calls``)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    """Sum of the latencies of every call: its time on the wire, from send to answer, every
    attempt included (waiting for a slot or the rate limit is not in it: ``queued_seconds``)."""
    queued_seconds: float = 0.0
    """Sum of the time calls waited before going on the wire: for a concurrency slot, the rate
    limit (``--rps``) and between retries."""
    retries: int = 0
    """Requests sent again after a failed attempt (refused, reset, 429, 5xx, timed out)."""
    rounds: int = 0
    """Sequential rounds of windows (a batch of windows sent together counts once)."""
    repairs: dict[str, int] = Field(default_factory=lambda: {k: 0 for k in REPAIR_KINDS})

    def add(self, other: Usage) -> None:
        self.calls += other.calls
        self.cached_calls += other.cached_calls
        self.failed_queries += other.failed_queries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.latency_s += other.latency_s
        self.queued_seconds += other.queued_seconds
        self.retries += other.retries
        self.rounds += other.rounds
        for kind, count in other.repairs.items():
            self.repairs[kind] = self.repairs.get(kind, 0) + count

    @property
    def failed_calls(self) -> int:
        """The old name of ``failed_queries`` (it always counted queries, not calls)."""
        return self.failed_queries

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class WindowTrace(BaseModel):
    """One window asked of the model: which candidates, what came back, what it cost."""

    round: int
    """The sequential round of the strategy this window belongs to (0-based)."""
    docids: list[str]
    """The window's candidates in the order they were shown (identifier 1 first)."""
    answer: str
    """The model's raw answer."""
    permutation: list[int]
    """The parsed permutation: 0-based positions in ``docids``, most relevant first."""
    repair: RepairReport
    score: float | None = None
    """The relevance score or preference a scoring method read from logprobs (pointwise,
    likelihood, pairwise); None for a generated permutation."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    queued_seconds: float = 0.0
    """Time this window's calls waited before going on the wire (see ``Usage``)."""
    retries: int = 0
    """Requests of this window sent again after a failed attempt."""
    cached: bool = False
    """Every completion of this window came from the response cache."""
    cached_attempts: int | None = None
    """How many of ``attempts`` came from the cache (None: all when ``cached``, else none)."""
    attempts: int = 1
    """Completions this window took: 2 when a truncated answer was asked again."""


class Ranking(BaseModel):
    """The result for one query: candidates in the new order, and how it was obtained.

    ``candidates[i].score`` is ``n - i`` for ``n`` candidates, the score written to the JSONL
    and TREC outputs (``permrank.runs.io``), so Python and files agree; the score a candidate
    came with is ``candidates[i].first_stage_score``. A scoring method's own scores (pointwise,
    likelihood, pairwise, score) are in ``trace[j].score``.
    """

    query: Query
    candidates: list[Candidate]
    """All candidates, most relevant first."""
    trace: list[WindowTrace] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    seconds: float = 0.0
    """Wall time spent on this query."""
    error: str | None = None
    """Why this query failed (its candidates are then in their input order)."""
    layout: Literal["permrank", "rank_llm"] = "permrank"

    @model_validator(mode="after")
    def _rank_scored(self) -> Ranking:
        """Candidates carry their rank-derived score; the first-stage one moves aside once."""
        scores = rank_scores(len(self.candidates))
        out = []
        for candidate, score in zip(self.candidates, scores, strict=True):
            moved = "first_stage_score" in candidate.model_fields_set
            if candidate.score == score and moved:
                out.append(candidate)
                continue
            update: dict[str, Any] = {"score": score}
            if not moved:
                update["first_stage_score"] = candidate.score
            out.append(candidate.model_copy(update=update))
        self.candidates = out
        return self

    @property
    def docids(self) -> list[str]:
        return [c.docid for c in self.candidates]


class Completion(BaseModel):
    """One answer from a backend."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    """Time on the wire (every attempt's)."""
    queued_s: float = 0.0
    """Time waited before the wire: a concurrency slot, the rate limit, between retries."""
    retries: int = 0
    finish_reason: str | None = None
    cached: bool = False
    raw: dict[str, Any] | None = None


@dataclass
class Exchange:
    """One raw request's answer and what it cost: time on the wire (every attempt's), time
    waited before it (a concurrency slot, the rate limit, between retries), retries made, and
    whether it came from a response cache (then it cost nothing)."""

    answer: Any
    """The decoded JSON answer: an object (a list for TEI's ``/rerank``)."""
    latency_s: float
    queued_s: float = 0.0
    retries: int = 0
    cached: bool = False
