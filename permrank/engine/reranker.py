"""``Reranker(model, base_url).rank(query, documents)``: the Python API over the engine.

Longer than 400 lines for a reason: ``Reranker`` is the API's one entry point; its constructor
maps every flat keyword and option group onto a backend, a strategy and a method, and its
docstring is the options' reference. Input normalisation lives in ``engine/inputs.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any

from permrank.backends.base import Backend
from permrank.core.errors import ConfigError
from permrank.core.prompts import (
    PromptBudget,
    Template,
    load_template,
)
from permrank.core.strategies import Strategy, describe_strategy, get_strategy
from permrank.core.tokens import (
    Tokenizer,
    default_tokenizer,
)
from permrank.core.types import Query, Ranking, Request, Usage
from permrank.engine.inputs import (
    CandidateLike,
    RequestLike,
    method_takes,
    option_group,
    strategy_takes,
    to_candidates,
    to_request,
    to_requests,
)
from permrank.engine.methods.base import Method
from permrank.engine.pipeline import Limits, MemoTokenizer, Pipeline, Sampling, rerank_request
from permrank.engine.stream import OnError, rerank_stream

log = logging.getLogger(__name__)


class _LoopThread:
    """A private event loop in a thread, so the sync API works inside Jupyter's loop too.

    When the caller is interrupted while it waits (Ctrl-C's ``KeyboardInterrupt``, a SIGTERM
    handler's ``SystemExit``), the work on the loop is cancelled and waited for (up to
    ``cancel_grace_s``) before the interruption goes on: no request is sent or retried after
    it, and nothing is left pending for the interpreter to destroy noisily at exit.
    """

    cancel_grace_s = 5.0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Any:
        finished = threading.Event()

        async def tracked() -> Any:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            return future.result()
        except BaseException:
            if future.cancel():  # still running: its task is cancelled on the loop
                finished.wait(self.cancel_grace_s)
            raise


class Reranker:
    """Rerank with an LLM: ``Reranker(model, base_url).rank(query, documents)``.

    Options come in a few groups: ``strategy`` (a value such as ``TopDownPartition(top_n=10)``
    or a name), ``method`` (a name or ``get_method(...)``), ``prompt``, ``sampling``
    (``Sampling(temperature, seed, max_tokens, extra)``), ``limits`` (``Limits(concurrency, rps,
    timeout_s, max_retries, transport, max_response_bytes)``), ``budget``
    (``Budget(max_passage_tokens, context_window)``), ``cache`` and ``on_error``. Every group's
    field is also a flat keyword (``temperature=0``, ``concurrency=16``, ``extra_body`` for
    ``Sampling.extra``); a flat keyword and its group that disagree are a ``ConfigError``.

    The flat options name what they are: ``strategy`` (a name of ``STRATEGIES`` or a Strategy
    value), ``window_size``, ``step`` and ``passes`` (sliding; 10 and 1 when left out), ``top_k``,
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
    forces every answer into the ``[i] > [j] > ...`` shape (``permrank.core.constrain``).
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
        sampling: Sampling | None = None,
        limits: Limits | None = None,
        budget: PromptBudget | None = None,
    ):
        sampling = option_group(
            "sampling",
            sampling,
            Sampling,
            temperature=temperature,
            seed=seed,
            max_tokens=max_tokens,
            extra=extra_body or {},
        )
        limits = option_group(
            "limits",
            limits,
            Limits,
            concurrency=concurrency,
            rps=rps,
            timeout_s=timeout_s,
            max_retries=max_retries,
            transport=transport,
            max_response_bytes=max_response_bytes,
        )
        budget = option_group(
            "budget",
            budget,
            PromptBudget,
            max_passage_tokens=max_passage_tokens,
            context_window=context_window,
        )
        concurrency, rps, timeout_s = limits.concurrency, limits.rps, limits.timeout_s
        max_retries, transport = limits.max_retries, limits.transport
        max_response_bytes, context_window = limits.max_response_bytes, budget.context_window
        self._to_probe: tuple[str | list[str], str, str, float] | None = None
        self.server_info = server_info
        """What the probe learnt (``permrank.backends.probe.ServerInfo``): given (the CLI
        probed already) or learnt before the first request."""
        # ``top_n`` (places guaranteed at the top) goes to the method when it takes it
        # (pairwise; unless method_options name it), and to the strategy unless only the
        # method takes it.
        method_top_n = top_n if top_n is not None and method_takes(method, "top_n") else None
        if isinstance(strategy, str):
            strategy_top_n = top_n
            if method_top_n is not None and not strategy_takes(strategy, "top_n"):
                strategy_top_n = None
            strategy = get_strategy(
                strategy,
                window_size=window_size,
                step=step,
                passes=passes,
                top_k=top_k,
                top_n=strategy_top_n,
                **(strategy_options or {}),
            )
        self.strategy = strategy
        self.template = prompt if isinstance(prompt, Template) else load_template(prompt)
        if backend == "vllm":
            from permrank.backends.vllm_inprocess import VllmInProcessBackend
            from permrank.servers.convert import default_model_dir

            backend = VllmInProcessBackend(
                model or default_model_dir(), max_model_len=context_window
            )
            tokenizer = tokenizer or backend.tokenizer()
        elif isinstance(backend, str) and backend != "openai":
            raise ConfigError(f"backend must be 'openai', 'vllm' or a Backend (got {backend!r})")
        http_options: dict[str, Any] = {
            "api_key_env": api_key_env,
            "concurrency": concurrency,
            "rps": rps,
            "timeout_s": timeout_s,
            "max_retries": max_retries,
            "transport": transport,
            "max_response_bytes": max_response_bytes,
        }
        if (backend is None or backend == "openai") and not isinstance(base_url, str | None):
            if len(base_url) > 1:  # several replicas of the model: one pool
                from permrank.backends.pool import pool_backend

                backend = pool_backend(base_url, model or "", **http_options)
                urls = [u if isinstance(u, str) else u[0] for u in base_url]
                self._to_probe = (urls, model or "", api_key_env, timeout_s)
        if isinstance(base_url, str) or base_url is None:
            url = base_url or ""
        else:
            first = next(iter(base_url), "")
            url = first if isinstance(first, str) else first[0]
        if backend is None or backend == "openai":
            from permrank.backends.openai import OpenAIBackend

            backend = OpenAIBackend(url, model or "", **http_options)
            self._to_probe = (url, model or "", api_key_env, timeout_s)
        if cache is not None:
            from permrank.backends.cache import CachingBackend

            backend = CachingBackend(backend, cache)  # type: ignore[arg-type]
        assert not isinstance(backend, str)
        self.backend: Backend = backend
        # Requests in flight in all: per endpoint times the endpoints of a pool.
        self.concurrency = getattr(backend, "pool_concurrency", None) or concurrency
        self.on_error: OnError = on_error
        if isinstance(method, str):
            from permrank.engine.methods import get_method

            options: dict[str, Any] = {"top_k": top_k, **(method_options or {})}
            if method_top_n is not None and not {"top_n", "k"} & set(options):
                options["top_n"] = method_top_n  # method_options' own top_n (or k) comes first
            self.method: Method | None = get_method(method, **options)
        else:
            self.method = method
        self.pipeline = Pipeline(
            method=self.method,
            strategy=self.strategy,
            template=self.template,
            backend=self.backend,
            sampling=sampling,
            budget=budget,
            tokenizer=MemoTokenizer(tokenizer or default_tokenizer()),
        )
        self.constrain = constrain
        if constrain:
            from permrank.core.constrain import json_answer_as_ranking, window_fields

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

        from permrank.backends.probe import aprobe_replicas

        base_url, model, api_key_env, timeout_s = self._to_probe
        api_key = os.environ.get(api_key_env)
        info = self.server_info
        if info is None:
            infos = await aprobe_replicas(
                [base_url] if isinstance(base_url, str) else base_url,
                model,
                dead_ok=True,  # a pool goes on without a dead replica (retried later)
                api_key=api_key,
                timeout_s=min(timeout_s, 30.0),
                hint="start the server, or check the base_url given to Reranker",
                strict_model=False,  # an alias the server accepts is not refused here
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
        self, requests: Iterable[RequestLike], *, spent: Usage | None = None
    ) -> AsyncGenerator[Ranking, None]:
        """Rankings in input order; ``spent`` is charged with every answer as it arrives
        (see ``rerank_stream``). The endpoint is probed first (``aprobe``). ``requests`` are
        ``Request``s, ``(query, documents)`` pairs or dicts (see ``to_request``)."""
        await self.aprobe()
        stream = rerank_stream(
            self.pipeline,
            [to_request(r, i) for i, r in enumerate(requests)]  # refused before any call
            if isinstance(requests, list | tuple)
            else to_requests(requests),
            max_queries_in_flight=max(4, 2 * self.concurrency),
            on_error=self.on_error,
            spent=spent,
        )
        try:
            async for ranking in stream:
                yield ranking
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def arerank_batch(self, requests: Iterable[RequestLike]) -> list[Ranking]:
        return [ranking async for ranking in self.astream(requests)]

    def rerank_batch(self, requests: Iterable[RequestLike]) -> list[Ranking]:
        """Rerank many queries at once; Rankings in input order. ``requests`` are ``Request``s,
        ``(query, documents)`` pairs or dicts ``{"query", "documents", "qid"?}``, documents being
        strings, dicts or Candidates (as ``rank`` takes)."""
        return self._sync(self.arerank_batch(requests))

    def manifest(self) -> dict[str, Any]:
        """Every parameter of this reranker, for a run manifest (no secrets)."""
        strategy = describe_strategy(self.strategy)
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


_MOVED_FROM_RERANK = (
    "permrank.engine.pipeline",
    "permrank.engine.stream",
    "permrank.engine.usage",
    "permrank.core.types",
)


def __getattr__(name: str) -> Any:
    """The names the old ``permrank.rerank`` module had (``ask_window``, ``drive_strategy``,
    ``failed_ranking``, ``usage_of``...) that now live in the engine's other modules."""
    import importlib

    for module in _MOVED_FROM_RERANK:
        found = getattr(importlib.import_module(module), name, _MISSING)
        if found is not _MISSING:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MISSING = object()


def rank(
    query: str,
    documents: Sequence[CandidateLike],
    *,
    model: str | None = None,
    base_url: str | Sequence[str | tuple[str, float]] | None = None,
    qid: str = "0",
    **options: Any,
) -> Ranking:
    """Rerank ``documents`` for ``query`` in one call: a ``Reranker(model, base_url,
    **options)`` used once and closed. For many queries keep one ``Reranker`` (its connections
    and caches are reused) or use ``Reranker.rerank_batch``."""
    with Reranker(model, base_url, **options) as reranker:
        ranking: Ranking = reranker.rank(query, documents, qid=qid)
        return ranking
