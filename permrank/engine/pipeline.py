"""The driver of one query: render, send and parse each window a strategy plans.

A query's windows go in the order its strategy plans them; the windows of one batch are in
flight together (a task group: when one fails for good its siblings are cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from permrank.backends.base import Backend
from permrank.core.errors import PermrankError
from permrank.core.parse import parse_permutation
from permrank.core.prompts import (
    PromptBudget,
    Template,
    answer_tokens,
    count_message_tokens,
    render_window,
)
from permrank.core.strategies import Strategy
from permrank.core.tokens import (
    DEFAULT_MEMO_BYTES,
    ByteBoundedMemo,
    MemoDict,
    Tokenizer,
    default_tokenizer,
    size_of,
)
from permrank.core.types import Completion, Ranking, Request, WindowTrace
from permrank.engine.usage import _SPEND, Spend, _count, usage_of

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Sampling:
    """Sampling parameters, always sent explicitly (``Reranker(..., sampling=Sampling(...))``)."""

    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    """Answer budget; by default sized to a full permutation of the window."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra request fields (e.g. a grammar), sent as they are."""


@dataclass(frozen=True)
class Limits:
    """How hard an endpoint is pushed and how long it is waited for
    (``Reranker(..., limits=Limits(concurrency=16))``)."""

    concurrency: int = 8
    """Requests in flight (per endpoint of a pool)."""
    rps: float | None = None
    """Requests per second at most (None: no limit)."""
    timeout_s: float = 120.0
    """One request's time limit."""
    max_retries: int = 5
    """Attempts after a failed one (refused, reset, 429, 5xx, timed out)."""
    transport: str = "auto"
    """``auto`` (aiohttp for ``http://`` without a proxy, else the openai SDK), ``openai`` or
    ``aiohttp``."""
    max_response_bytes: int = 32 * 1024 * 1024
    """The largest answer read."""


Budget = PromptBudget
"""How much of a prompt passages may take (``max_passage_tokens``, ``context_window``,
``max_query_tokens``): ``Reranker(..., budget=Budget(context_window=32768))``."""


class MemoTokenizer:
    """A tokenizer that remembers its recent answers.

    Windows repeat most of their text: a passage is shown in several windows, and a template's
    instructions and turn messages are the same in every window. Rendering counts and cuts all of
    it, so remembering removes most of the engine's time. What it remembers is bounded by bytes
    (``max_bytes``), oldest forgotten first, whatever the texts' lengths.
    """

    def __init__(self, inner: Tokenizer, max_bytes: int = DEFAULT_MEMO_BYTES):
        self.inner = inner
        self.name = inner.name
        self.at_most_one_token_per_byte = getattr(inner, "at_most_one_token_per_byte", False)
        self.remote = getattr(inner, "remote", False)
        self.counts = MemoDict(inner.count, max_bytes // 2)
        self.cuts = ByteBoundedMemo(max_bytes // 2)
        cut_of, put_cut, get_cut = inner.truncate, self.cuts.put, self.cuts.get

        def truncate(text: str, max_tokens: int) -> str:
            key = (text, max_tokens)
            found = get_cut(key)
            if found is None:
                found = cut_of(text, max_tokens)
                put_cut(key, found, size_of(text) + (0 if found is text else size_of(found)))
            return found

        self.count = self.counts.__getitem__
        self.truncate = truncate

    async def awarm(self, texts: Iterable[str]) -> None:
        """Have a remote tokenizer ask for every text of a window at once (see tokens.py)."""
        warm = getattr(self.inner, "awarm", None)
        if warm is not None:
            await warm(texts)

    async def acut(self, texts: Iterable[str], max_tokens: int) -> None:
        """Have a remote tokenizer cut every text to ``max_tokens`` at once (concurrently), and
        remember the cuts: the scoring methods cut each passage on the event loop, where a
        request would block every other request of the run (one at a time, the server idle)."""
        atruncate = getattr(self.inner, "atruncate", None)
        if atruncate is None:
            return
        get_cut, put_cut = self.cuts.get, self.cuts.put
        todo = [t for t in dict.fromkeys(texts) if t and get_cut((t, max_tokens)) is None]
        if not todo:
            return
        await self.awarm(todo)
        cuts = await asyncio.gather(*(atruncate(t, max_tokens) for t in todo))
        for text, found in zip(todo, cuts, strict=True):
            put_cut(
                (text, max_tokens), found, size_of(text) + (0 if found is text else size_of(found))
            )


def window_texts(query: str, passages: list[tuple[str, str | None]]) -> list[str]:
    """Every text ``render_window`` counts first: the query (as given and as shown), each
    passage and title as shown."""
    from permrank.core.prompts import as_data

    texts = [query, as_data(query)]
    for text, title in passages:
        texts.append(as_data(text))
        if title:
            texts.append(as_data(title))
    return texts


def memo_tokenizer() -> Tokenizer:
    return MemoTokenizer(default_tokenizer())


class Method(Protocol):
    """A way to rank other than the generated permutation (``permrank.engine.methods``): one
    coroutine from a query to its Ranking, and what the manifest says of it."""

    name: str

    async def rerank(self, pipeline: Pipeline, request: Request) -> Ranking: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Pipeline:
    """Everything one query's reranking needs, minus the query."""

    strategy: Strategy
    template: Template
    backend: Backend
    sampling: Sampling = field(default_factory=Sampling)
    budget: PromptBudget = field(default_factory=PromptBudget)
    tokenizer: Tokenizer = field(default_factory=memo_tokenizer)
    window_extra: Callable[[int], dict[str, Any]] | None = None
    """Per-window extra request fields by window length (constrained decoding)."""
    answer_text: Callable[[str], str] | None = None
    """Turns a raw answer into the text parsed (a constrained JSON answer into ``[i] > [j]``)."""
    method: Method | None = None
    """A scoring method other than the generated permutation (see ``permrank.engine.methods``)."""


async def ask_window(
    pipeline: Pipeline, request: Request, window: list[int], round_index: int
) -> tuple[list[int], WindowTrace]:
    """Render, send and parse one window; the window reordered and its trace."""
    passages = [(request.candidates[i].text, request.candidates[i].title) for i in window]

    def render() -> tuple[int, list[dict[str, str]]]:
        max_tokens = pipeline.sampling.max_tokens or answer_tokens(len(window), pipeline.tokenizer)
        messages = render_window(
            pipeline.template,
            request.query.text,
            passages,
            budget=pipeline.budget,
            tokenizer=pipeline.tokenizer,
            max_tokens=max_tokens,
        )
        return max_tokens, messages

    if getattr(pipeline.tokenizer, "remote", False):  # a server counts: never on the loop
        warm = pipeline.tokenizer.awarm  # type: ignore[attr-defined]
        await warm(window_texts(request.query.text, passages))
    max_tokens, messages = await off_loop(pipeline, render)
    extra = dict(pipeline.sampling.extra)
    if pipeline.window_extra is not None:
        extra.update(pipeline.window_extra(len(window)))

    async def send(budget: int) -> Completion:
        return await pipeline.backend.complete(
            messages,
            max_tokens=budget,
            temperature=pipeline.sampling.temperature,
            seed=pipeline.sampling.seed,
            extra=extra or None,
        )

    completion = await send(max_tokens)
    _count(completion)
    attempts = 1
    cached_attempts = int(completion.cached)
    # An answer cut by max_tokens is asked once more with up to twice the budget (as much as
    # the context leaves), then repaired whatever comes back.
    more_tokens = 0
    if completion.finish_reason == "length":
        used = await off_loop(pipeline, count_message_tokens, messages, pipeline.tokenizer)
        room = pipeline.budget.context_window - used
        more_tokens = min(2 * max_tokens, room)
    if more_tokens > max_tokens:
        log.warning(
            "query %s: answer cut at %d tokens; asking again with %d",
            request.query.qid,
            max_tokens,
            more_tokens,
        )
        first = completion
        completion = await send(more_tokens)
        _count(completion)
        completion.prompt_tokens += first.prompt_tokens
        completion.completion_tokens += first.completion_tokens
        completion.latency_s += first.latency_s
        completion.queued_s += first.queued_s
        completion.retries += first.retries
        cached_attempts = int(first.cached) + int(completion.cached)
        completion.cached = first.cached and completion.cached
        attempts = 2
    text = pipeline.answer_text(completion.text) if pipeline.answer_text else completion.text
    permutation, report = parse_permutation(text, len(window))
    trace = WindowTrace(
        round=round_index,
        docids=[request.candidates[i].docid for i in window],
        answer=completion.text,
        permutation=permutation,
        repair=report,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        latency_s=completion.latency_s,
        queued_seconds=completion.queued_s,
        retries=completion.retries,
        cached=completion.cached,
        cached_attempts=cached_attempts,
        attempts=attempts,
    )
    return [window[p] for p in permutation], trace


AskWindow = Callable[
    [Pipeline, Request, list[int], int],
    Awaitable[tuple[list[int], WindowTrace | list[WindowTrace]]],
]


async def off_loop(pipeline: Pipeline, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when the tokenizer it counts with is a server's (its
    requests then wait on the event loop, which must go on), else right here."""
    if getattr(pipeline.tokenizer, "remote", False):
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def precut(pipeline: Pipeline, request: Request) -> None:
    """Cut the passages (and titles) a scoring method will show, before it starts: all at once
    through a remote tokenizer, off the event loop's critical path (``MemoTokenizer.acut``)."""
    acut = getattr(pipeline.tokenizer, "acut", None)
    if acut is None or not getattr(pipeline.tokenizer, "remote", False):
        return  # a local tokenizer cuts in microseconds
    top_k = getattr(pipeline.method, "top_k", None)
    shown = request.candidates if top_k is None else request.candidates[:top_k]
    texts = [c.text for c in shown] + [c.title for c in shown if c.title]
    await acut(texts, pipeline.budget.max_passage_tokens)


async def rerank_request(
    pipeline: Pipeline, request: Request, *, run_spend: Spend | None = None
) -> Ranking:
    """Rerank one query.

    Raises the ``PermrankError`` that stopped it (a backend failure, a template that does not
    fit, missing logprobs, ...) with ``qid``, ``usage`` (what the query really spent, its
    ``failed_queries`` 1) and ``trace`` (the windows answered before) set on it. ``run_spend``,
    when given, is charged with every answer too, as it arrives.
    """
    spend = Spend(parent=run_spend)
    token = _SPEND.set(spend)
    try:
        if pipeline.method is not None:
            await precut(pipeline, request)
            return await pipeline.method.rerank(pipeline, request)
        return await drive_strategy(pipeline, request, ask_window)
    except PermrankError as exc:
        usage = spend.usage.model_copy(deep=True)
        usage.rounds = getattr(exc, "rounds", 0)
        usage.failed_queries = 1
        exc.qid = request.query.qid  # type: ignore[attr-defined]
        exc.usage = usage  # type: ignore[attr-defined]
        if not hasattr(exc, "trace"):
            exc.trace = []  # type: ignore[attr-defined]
        raise
    finally:
        _SPEND.reset(token)


async def all_or_none(awaitables: Iterable[Awaitable[Any]]) -> list[Any]:
    """Await together; when one fails, the others are cancelled (nothing more is sent for them)
    and its exception is raised (not an ExceptionGroup). Results in the given order."""
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(a) for a in awaitables]  # type: ignore[arg-type]
    except BaseExceptionGroup as failures:
        first: BaseException = failures
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [task.result() for task in tasks]


async def _into(results: dict[int, Any], key: int, answer: Awaitable[Any]) -> None:
    results[key] = await answer


async def drive_strategy(pipeline: Pipeline, request: Request, ask: AskWindow) -> Ranking:
    """Run the pipeline's strategy for one query, each window answered by ``ask``.

    A batch's windows run in a task group: when one fails for good the others are cancelled, and
    the error carries the trace of the windows answered (``trace``) and the rounds done."""
    started = time.perf_counter()
    trace: list[WindowTrace] = []
    plan = pipeline.strategy.plan(len(request.candidates))
    rounds = 0
    try:
        batch = next(plan)
        while True:
            answered: dict[int, tuple[list[int], WindowTrace | list[WindowTrace]]] = {}
            try:
                if len(batch) == 1:  # no task needed
                    answered[0] = await ask(pipeline, request, batch[0], rounds)
                else:
                    await all_or_none(
                        _into(answered, i, ask(pipeline, request, window, rounds))
                        for i, window in enumerate(batch)
                    )
            except PermrankError as exc:
                for i in sorted(answered):
                    window_trace = answered[i][1]
                    trace.extend(window_trace if isinstance(window_trace, list) else [window_trace])
                exc.trace = trace  # type: ignore[attr-defined]
                exc.rounds = rounds + 1  # type: ignore[attr-defined]
                raise
            answers = [answered[i] for i in range(len(batch))]
            rounds += 1
            for _, window_trace in answers:
                trace.extend(window_trace if isinstance(window_trace, list) else [window_trace])
            batch = plan.send([order for order, _ in answers])
    except StopIteration as stop:
        order: list[int] = stop.value
    return ranking_of(request, order, trace, rounds, started)


def ranking_of(
    request: Request, order: list[int], trace: list[WindowTrace], rounds: int, started: float
) -> Ranking:
    """The Ranking of ``request`` in ``order`` (indices into its candidates), with its trace,
    the usage counted from it, and the seconds since ``started``."""
    return Ranking(
        query=request.query,
        candidates=[request.candidates[i] for i in order],
        trace=trace,
        usage=usage_of(trace, rounds),
        seconds=time.perf_counter() - started,
        layout=request.layout,
    )
