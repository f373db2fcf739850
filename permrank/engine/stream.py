"""Many queries at once: a bounded read-ahead of queries in flight, results in input order,
and the per-query failure policy (``on_error``)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Literal

from permrank.core.errors import ConfigError, PermrankError
from permrank.core.types import Ranking, Request, Usage, WindowTrace
from permrank.engine.pipeline import Pipeline, rerank_request
from permrank.engine.usage import Spend

log = logging.getLogger(__name__)


def failed_ranking(
    request: Request,
    reason: str,
    *,
    usage: Usage | None = None,
    trace: list[WindowTrace] | None = None,
) -> Ranking:
    """A query that could not be reranked: its input order, with the reason, and what it spent
    before it failed (``usage``; its ``failed_queries`` is 1)."""
    usage = usage.model_copy(deep=True) if usage is not None else Usage()
    usage.failed_queries = 1
    return Ranking(
        query=request.query,
        candidates=list(request.candidates),
        trace=list(trace or []),
        error=reason,
        usage=usage,
        layout=request.layout,
    )


OnError = Literal["fail", "skip"]


async def rerank_stream(
    pipeline: Pipeline,
    requests: Iterable[Request],
    *,
    max_queries_in_flight: int = 32,
    on_error: OnError = "fail",
    spent: Usage | None = None,
) -> AsyncIterator[Ranking]:
    """Rerank many queries concurrently; yield their Rankings in input order.

    At most ``max_queries_in_flight`` queries are read ahead and worked on at once, so memory is
    bounded whatever the input's length. With ``on_error="fail"`` the first query that fails
    stops the run (everything yielded before it stands) with its ``PermrankError``, whatever its
    kind (backend, template overflow, missing logprobs, ...); with ``"skip"`` it is yielded with
    its input order, ``error`` set and the usage it really spent, and the run goes on.

    ``spent``, when given, is charged with every answer's cost as it arrives (calls, cached
    calls, tokens, latency), finished queries or not: what an interrupted run really spent.
    """
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip' (got {on_error!r})")
    run_spend = Spend(usage=spent) if spent is not None else None
    pending: deque[tuple[Request, asyncio.Task[Ranking]]] = deque()
    source = iter(requests)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < max_queries_in_flight:
                request = next(source, None)
                if request is None:
                    exhausted = True
                    break
                task = asyncio.ensure_future(rerank_request(pipeline, request, run_spend=run_spend))
                pending.append((request, task))
            if not pending:
                return
            request, task = pending.popleft()
            try:
                ranking = await task
            except PermrankError as exc:
                qid = request.query.qid
                if on_error == "fail":
                    if not str(exc).startswith(f"query {qid} failed"):
                        exc.args = (f"query {qid} failed: {exc}",)
                    raise
                log.error("query %s failed: %s", qid, exc)
                ranking = failed_ranking(
                    request,
                    str(exc),
                    usage=getattr(exc, "usage", None),
                    trace=getattr(exc, "trace", None),
                )
            yield ranking
    finally:
        for _, task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*(t for _, t in pending), return_exceptions=True)
