"""Usage counting: what every answer cost, charged as it arrives (calls, tokens, wire time,
queueing, retries, cache hits), and the usage of a query from its trace."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from permrank.core.types import Completion, Ranking, Usage, WindowTrace

log = logging.getLogger(__name__)


@dataclass
class Spend:
    """What a query (and the run it belongs to) has cost so far, counted as each answer arrives.

    A query that fails, or is cancelled by an interrupted run, keeps what it really spent: the
    answers it was given before, not only those of the windows that made it into a Ranking.
    """

    usage: Usage = field(default_factory=Usage)
    parent: Spend | None = None

    def count(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        cached: bool,
        queued_s: float = 0.0,
        retries: int = 0,
    ) -> None:
        spend: Spend | None = self
        while spend is not None:
            usage = spend.usage
            if cached:
                usage.cached_calls += 1
            else:
                usage.calls += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.latency_s += latency_s
            usage.queued_seconds += queued_s
            usage.retries += retries
            spend = spend.parent


_SPEND: contextvars.ContextVar[Spend | None] = contextvars.ContextVar("spend", default=None)


def count_call(
    prompt_tokens: int,
    completion_tokens: int,
    latency_s: float,
    cached: bool = False,
    queued_s: float = 0.0,
    retries: int = 0,
) -> None:
    """Count one answered call against the query being reranked (a no-op outside one).

    Every answer a query is given passes here (``ask_window``; ``methods.base.call``)."""
    spend = _SPEND.get()
    if spend is not None:
        spend.count(prompt_tokens, completion_tokens, latency_s, cached, queued_s, retries)


def _count(c: Completion) -> None:
    count_call(c.prompt_tokens, c.completion_tokens, c.latency_s, c.cached, c.queued_s, c.retries)


def usage_of(trace: Sequence[WindowTrace], rounds: int) -> Usage:
    usage = Usage(rounds=rounds)
    for t in trace:
        cached = t.cached_attempts
        if cached is None:
            cached = t.attempts if t.cached else 0
        usage.calls += t.attempts - cached
        usage.cached_calls += cached
        usage.prompt_tokens += t.prompt_tokens
        usage.completion_tokens += t.completion_tokens
        usage.latency_s += t.latency_s
        usage.queued_seconds += t.queued_seconds
        usage.retries += t.retries
        for kind in t.repair.kinds():
            usage.repairs[kind] = usage.repairs.get(kind, 0) + 1
    return usage


def total_usage(rankings: Iterable[Ranking]) -> Usage:
    total = Usage()
    for ranking in rankings:
        total.add(ranking.usage)
    return total
