"""The driver: strategy x template x backend x parse, many queries at once.

Each query's windows go in the order its strategy plans them; windows of different queries (and
the windows of one batch) are in flight together, bounded by the backend's concurrency. Results
come out in input order, streamed, with a bounded number of queries in memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .backends.base import Backend
from .errors import ConfigError, EndpointUnavailable, PermrankError
from .methods.base import Method
from .parse import parse_permutation
from .prompts import (
    PromptBudget,
    Template,
    answer_tokens,
    count_message_tokens,
    load_template,
    render_window,
)
from .strategies import Strategy, get_strategy
from .tokens import (
    DEFAULT_MEMO_BYTES,
    ByteBoundedMemo,
    MemoDict,
    Tokenizer,
    default_tokenizer,
    size_of,
)
from .types import Candidate, Completion, Query, Ranking, Request, Usage, WindowTrace

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Sampling parameters, always sent explicitly."""

    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    """Answer budget; by default sized to a full permutation of the window."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra request fields (e.g. a grammar), sent as they are."""


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


def window_texts(query: str, passages: list[tuple[str, str | None]]) -> list[str]:
    """Every text ``render_window`` counts first: the query (as given and as shown), each
    passage and title as shown."""
    from .prompts import as_data

    texts = [query, as_data(query)]
    for text, title in passages:
        texts.append(as_data(text))
        if title:
            texts.append(as_data(title))
    return texts


def memo_tokenizer() -> Tokenizer:
    return MemoTokenizer(default_tokenizer())


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
    """A scoring method other than the generated permutation (see ``permrank.methods``)."""


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
        max_tokens, messages = await asyncio.to_thread(render)
    else:
        max_tokens, messages = render()
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
        if getattr(pipeline.tokenizer, "remote", False):
            used = await asyncio.to_thread(count_message_tokens, messages, pipeline.tokenizer)
        else:
            used = count_message_tokens(messages, pipeline.tokenizer)
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


AskWindow = Callable[
    [Pipeline, Request, list[int], int],
    Awaitable[tuple[list[int], WindowTrace | list[WindowTrace]]],
]


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
    return Ranking(
        query=request.query,
        candidates=[request.candidates[i] for i in order],
        trace=trace,
        usage=usage_of(trace, rounds),
        seconds=time.perf_counter() - started,
        layout=request.layout,
    )


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


def total_usage(rankings: Iterable[Ranking]) -> Usage:
    total = Usage()
    for ranking in rankings:
        total.add(ranking.usage)
    return total


CandidateLike = Candidate | str | dict[str, Any]


def to_candidates(candidates: Sequence[CandidateLike]) -> list[Candidate]:
    """Accept strings, dicts (``text`` or ``contents``, optional ``docid``) or Candidates."""
    out = []
    for i, c in enumerate(candidates):
        if isinstance(c, Candidate):
            out.append(c)
        elif isinstance(c, str):
            out.append(Candidate(docid=str(i), text=c))
        elif isinstance(c, dict):
            data = dict(c)
            data.setdefault("docid", str(i))
            data["docid"] = str(data["docid"])
            if "text" not in data:
                data["text"] = data.pop("contents", None) or data.pop("segment", None) or ""
            out.append(Candidate(**data))
        else:
            raise ConfigError(f"candidate {i}: expected a string, a dict or a Candidate")
    return out


class _LoopThread:
    """A private event loop in a thread, so the sync API works inside Jupyter's loop too."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]


class Reranker:
    """Rerank with an LLM: ``Reranker(model, base_url).rank(query, documents)``.

    Options name what they are: ``strategy`` (a name of ``STRATEGIES`` or a Strategy value),
    ``window_size``, ``step`` and ``passes`` (sliding; 10 and 1 when left out), ``top_k``,
    ``top_n`` (tournament, tdpart), ``strategy_options`` (any other strategy parameter, e.g.
    ``{"shuffles": 3}``), ``prompt`` (a shipped template's name or a TOML path),
    ``temperature``, ``seed``, ``concurrency`` (requests in flight), ``rps`` (requests per second),
    ``cache`` (a SQLite file of answers, see ``permrank.backends.cache``; none by default),
    ``transport`` ("auto": aiohttp for ``http://`` endpoints without a proxy, the openai SDK
    otherwise; "openai" or "aiohttp" (alias "plain") to choose), ``max_response_bytes`` (the
    largest answer read, 32 MiB). An endpoint given by ``base_url`` is probed before the first
    request, as the CLI does (unless ``server_info`` says what a probe found): an unreachable
    one is one ``EndpointUnavailable`` at once. A ready
    ``backend`` can be given instead of ``model`` + ``base_url``, or
    ``backend="vllm"``: vLLM in this process, ``model`` being a Hugging Face model folder (the
    ``vllm`` extra; every window of a round, across queries, in one generate call).
    ``constrain`` ("grammar" for llama.cpp, "regex" for vLLM, "json" for OpenAI-style endpoints)
    forces every answer into the ``[i] > [j] > ...`` shape (``permrank.constrain``).
    ``base_url`` may be a list of replicas of one model (URLs, or (URL, weight) pairs), e.g.
    ``Reranker(model, [url1, url2])``: ``concurrency`` is then per endpoint and each window goes
    to the least busy replica (``permrank.backends.pool``).
    """

    def __init__(
        self,
        model: str | None = None,
        base_url: str | Sequence[str | tuple[str, float]] | None = None,
        *,
        backend: Backend | str | None = None,
        strategy: str | Strategy = "sliding",
        window_size: int = 20,
        step: int | None = None,
        passes: int | None = None,
        top_k: int | None = None,
        top_n: int | None = None,
        strategy_options: dict[str, Any] | None = None,
        prompt: str | Template = "rankgpt",
        method: str | Method = "listwise",
        method_options: dict[str, Any] | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
        max_tokens: int | None = None,
        max_passage_tokens: int = 300,
        context_window: int = 8192,
        concurrency: int = 8,
        rps: float | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 5,
        transport: str = "auto",
        max_response_bytes: int = 32 * 1024 * 1024,
        on_error: OnError = "fail",
        tokenizer: Tokenizer | None = None,
        extra_body: dict[str, Any] | None = None,
        cache: str | Path | None = None,
        constrain: str | None = None,
        server_info: Any = None,
    ):
        self._to_probe: tuple[str | list[str], str, str, float] | None = None
        self.server_info = server_info
        """What the probe learnt (``permrank.backends.probe.ServerInfo``): given (the CLI
        probed already) or learnt before the first request."""
        if isinstance(strategy, str):
            strategy = get_strategy(
                strategy,
                window_size=window_size,
                step=step,
                passes=passes,
                top_k=top_k,
                top_n=top_n,
                **(strategy_options or {}),
            )
        self.strategy = strategy
        self.template = prompt if isinstance(prompt, Template) else load_template(prompt)
        if backend == "vllm":
            from .backends.vllm_inprocess import VllmInProcessBackend
            from .commands.models import default_model_dir

            backend = VllmInProcessBackend(
                model or default_model_dir(), max_model_len=context_window
            )
            tokenizer = tokenizer or backend.tokenizer()
        elif isinstance(backend, str) and backend != "openai":
            raise ConfigError(f"backend must be 'openai', 'vllm' or a Backend (got {backend!r})")
        if (backend is None or backend == "openai") and not isinstance(base_url, str | None):
            if len(base_url) > 1:  # several replicas of the model: one pool
                from .backends.pool import pool_backend

                backend = pool_backend(
                    base_url,
                    model or "",
                    api_key_env=api_key_env,
                    concurrency=concurrency,
                    rps=rps,
                    timeout_s=timeout_s,
                    max_retries=max_retries,
                    transport=transport,
                )
                urls = [u if isinstance(u, str) else u[0] for u in base_url]
                self._to_probe = (urls, model or "", api_key_env, timeout_s)
        if isinstance(base_url, str) or base_url is None:
            url = base_url or ""
        else:
            first = next(iter(base_url), "")
            url = first if isinstance(first, str) else first[0]
        if backend is None or backend == "openai":
            from .backends.openai import OpenAIBackend

            backend = OpenAIBackend(
                url,
                model or "",
                api_key_env=api_key_env,
                concurrency=concurrency,
                rps=rps,
                timeout_s=timeout_s,
                max_retries=max_retries,
                transport=transport,
                max_response_bytes=max_response_bytes,
            )
            self._to_probe = (url, model or "", api_key_env, timeout_s)
        if cache is not None:
            from .backends.cache import CachingBackend

            backend = CachingBackend(backend, cache)  # type: ignore[arg-type]
        assert not isinstance(backend, str)
        self.backend: Backend = backend
        # Requests in flight in all: per endpoint times the endpoints of a pool.
        self.concurrency = getattr(backend, "pool_concurrency", None) or concurrency
        self.on_error: OnError = on_error
        if isinstance(method, str):
            from .methods import get_method

            self.method: Method | None = get_method(
                method, **{"top_k": top_k, **(method_options or {})}
            )
        else:
            self.method = method
        self.pipeline = Pipeline(
            method=self.method,
            strategy=self.strategy,
            template=self.template,
            backend=self.backend,
            sampling=Sampling(
                temperature=temperature, seed=seed, max_tokens=max_tokens, extra=extra_body or {}
            ),
            budget=PromptBudget(
                max_passage_tokens=max_passage_tokens, context_window=context_window
            ),
            tokenizer=MemoTokenizer(tokenizer or default_tokenizer()),
        )
        self.constrain = constrain
        if constrain:
            from .constrain import json_answer_as_ranking, window_fields

            window_fields(constrain, 1)  # refuses an unknown mode now
            self.pipeline.window_extra = functools.partial(window_fields, constrain)
            if constrain == "json":
                self.pipeline.answer_text = json_answer_as_ranking
        self._loop: _LoopThread | None = None

    async def aprobe(self) -> None:
        """Probe the endpoint once (as the CLI does, and not again when the CLI did): an
        unreachable endpoint or an unknown model is an ``EndpointUnavailable`` before any
        request; a loopback llama.cpp server's model file keys the response cache."""
        if self._to_probe is None:
            return
        import os

        from .backends.probe import aprobe

        base_url, model, api_key_env, timeout_s = self._to_probe
        api_key = os.environ.get(api_key_env)
        info = self.server_info
        if info is None:
            answers = await asyncio.gather(
                *(
                    aprobe(
                        url,
                        model,
                        api_key=api_key,
                        timeout_s=min(timeout_s, 30.0),
                        hint="start the server, or check the base_url given to Reranker",
                        strict_model=False,  # an alias the server accepts is not refused here
                    )
                    for url in ([base_url] if isinstance(base_url, str) else base_url)
                ),
                return_exceptions=True,
            )
            infos = [a for a in answers if not isinstance(a, BaseException)]
            failures = [a for a in answers if isinstance(a, BaseException)]
            if not infos:  # no endpoint answers: the first one's reason
                raise failures[0]
            for failure in failures:  # a pool goes on without a dead replica (retried later)
                log.warning("%s", failure)
            if len({i.model for i in infos}) > 1:
                raise EndpointUnavailable(
                    "the endpoints serve different models: "
                    + ", ".join(f"{i.base_url} serves {i.model!r}" for i in infos)
                    + "; the replicas of one Reranker must serve the same model"
                )
            info = infos[0]
        self._to_probe = None
        self.server_info = info
        if info.identity and hasattr(self.backend, "identity"):
            self.backend.identity = info.identity

    # -- one query ---------------------------------------------------------------------------
    async def arank(
        self, query: str, documents: Sequence[CandidateLike], *, qid: str = "0"
    ) -> Ranking:
        request = Request(query=Query(qid=qid, text=query), candidates=to_candidates(documents))
        if len(request.candidates) > 1:  # one candidate needs no model, nor an endpoint
            await self.aprobe()
        return await rerank_request(self.pipeline, request)

    def rank(self, query: str, documents: Sequence[CandidateLike], *, qid: str = "0") -> Ranking:
        """Rerank ``documents`` (strings, dicts or Candidates) for ``query``."""
        return self._sync(self.arank(query, documents, qid=qid))

    # -- many queries ------------------------------------------------------------------------
    async def astream(
        self, requests: Iterable[Request], *, spent: Usage | None = None
    ) -> AsyncGenerator[Ranking, None]:
        """Rankings in input order; ``spent`` is charged with every answer as it arrives
        (see ``rerank_stream``). The endpoint is probed first (``aprobe``)."""
        await self.aprobe()
        stream = rerank_stream(
            self.pipeline,
            requests,
            max_queries_in_flight=max(4, 2 * self.concurrency),
            on_error=self.on_error,
            spent=spent,
        )
        try:
            async for ranking in stream:
                yield ranking
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def arerank_batch(self, requests: Iterable[Request]) -> list[Ranking]:
        return [ranking async for ranking in self.astream(requests)]

    def rerank_batch(self, requests: Iterable[Request]) -> list[Ranking]:
        """Rerank many queries at once; Rankings in input order."""
        return self._sync(self.arerank_batch(requests))

    def manifest(self) -> dict[str, Any]:
        """Every parameter of this reranker, for a run manifest (no secrets)."""
        strategy = {k: v for k, v in vars(self.strategy).items()}
        return {
            "strategy": strategy,
            "template": {
                "name": self.template.name,
                "source": self.template.source,
                "sha256": self.template.sha256,
            },
            "backend": self.backend.describe(),
            "sampling": {
                "temperature": self.pipeline.sampling.temperature,
                "seed": self.pipeline.sampling.seed,
                "max_tokens": self.pipeline.sampling.max_tokens or "sized to the window",
                "extra": self.pipeline.sampling.extra,
            },
            "budget": vars(self.pipeline.budget),
            "tokenizer": self.pipeline.tokenizer.name,
            "constrain": self.constrain,
            "on_error": self.on_error,
            "method": self.method.describe() if self.method else {"name": "listwise"},
        }

    def _sync(self, coro: Awaitable[Any]) -> Any:
        if self._loop is None:
            self._loop = _LoopThread()
        return self._loop.run(coro)

    async def aclose(self) -> None:
        try:
            await self.backend.aclose()
        finally:
            # A server's tokenizer holds an HTTP session of its own.
            inner = getattr(self.pipeline.tokenizer, "inner", self.pipeline.tokenizer)
            close = getattr(inner, "aclose", None)
            if close is not None:
                await close()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run(self.aclose())
            self._loop.loop.call_soon_threadsafe(self._loop.loop.stop)
            self._loop = None

    def __enter__(self) -> Reranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
