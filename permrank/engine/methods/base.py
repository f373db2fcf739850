"""What every scoring method shares: the protocol, one way to call the endpoint, traces.

A method is a value a user names (``get_method("pointwise", normalisation="softmax")``) with
one coroutine, ``rerank(pipeline, request) -> Ranking``. Methods that score each passage alone
(pointwise yes/no, query likelihood) implement ``score(pipeline, query, candidate)`` and leave
the ordering to ``rerank_by_scores``. Every request goes through ``backend.request(route, body)``
so a Backend wrapper (a cache, a recorder) sees and can answer it like any chat completion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from permrank.core.errors import ConfigError
from permrank.core.logprobs import TokenLogprob, generated_tokens, require_logprobs
from permrank.core.types import (
    Candidate,
    Exchange,
    Query,
    Ranking,
    RepairReport,
    Request,
    WindowTrace,
)
from permrank.engine.pipeline import Method as Method  # the protocol, defined with the Pipeline
from permrank.engine.pipeline import all_or_none
from permrank.engine.pipeline import ranking_of as ranking_of

if TYPE_CHECKING:
    from permrank.engine.pipeline import Pipeline

Route = Literal["chat", "completions"]
ROUTES = {"chat": "/chat/completions", "completions": "/completions"}


class PassageScorer(Protocol):
    """Scores one passage for one query; higher is more relevant."""

    @property
    def name(self) -> str: ...

    @property
    def top_k(self) -> int | None: ...

    async def score(
        self, pipeline: Pipeline, query: Query, candidate: Candidate
    ) -> tuple[float, list[WindowTrace]]: ...


@dataclass
class Call:
    """One answered request: the first choice, what it cost, whether it came from a cache."""

    answer: dict[str, Any]
    choice: dict[str, Any]
    route: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    queued_s: float = 0.0
    retries: int = 0


async def exchange(pipeline: Pipeline, route: str, body: dict[str, Any]) -> Exchange:
    """POST ``body`` to ``route`` through the backend: an ``Exchange``
    (the JSON answer, time on the wire, time queued, retries, from a cache or not).

    A backend with a response cache (``permrank.backends.cache.CachingBackend``) keeps the whole
    JSON answer, so a repeated run asks nothing again. A wrapper may also answer ``request``
    itself and mark the answer ``"cached": true``."""
    backend = pipeline.backend
    ask = getattr(backend, "exchange", None)
    if ask is not None:
        done: Exchange = await ask(route, body)
    else:
        request = getattr(backend, "request", None)
        if request is None:
            raise ConfigError(
                f"backend {type(backend).__name__} cannot send raw requests (no request(route, "
                "body)); scoring methods other than listwise need an OpenAI-compatible backend"
            )
        answer, latency = await request(route, body)
        done = Exchange(answer=answer, latency_s=latency)
    if not done.cached and isinstance(done.answer, dict) and done.answer.get("cached"):
        done.cached = True
    return done


async def send(
    pipeline: Pipeline, route: str, body: dict[str, Any]
) -> tuple[dict[str, Any], float, bool]:
    """POST ``body`` to ``route`` through the backend: (JSON answer, latency, from cache)."""
    done = await exchange(pipeline, route, body)
    return done.answer, done.latency_s, done.cached


async def call(pipeline: Pipeline, route: str, body: dict[str, Any]) -> Call:
    """Send ``body`` with the model, temperature, seed and extra fields added; the first
    choice and its cost."""
    sampling = pipeline.sampling
    full = {"model": pipeline.backend.model, "temperature": sampling.temperature, **body}
    if sampling.seed is not None:
        full["seed"] = sampling.seed
    full.update(sampling.extra)
    done = await exchange(pipeline, route, full)
    answer = done.answer
    choice = (answer.get("choices") or [{}])[0] or {}
    usage = answer.get("usage") or {}
    from permrank.engine.usage import count_call

    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    count_call(
        prompt_tokens, completion_tokens, done.latency_s, done.cached, done.queued_s, done.retries
    )
    return Call(
        answer=answer,
        choice=choice,
        route=route,
        latency_s=done.latency_s,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached=done.cached,
        queued_s=done.queued_s,
        retries=done.retries,
    )


def prompt_body(route: Route, text: str, *, max_tokens: int, top_logprobs: int) -> dict[str, Any]:
    """A request asking for ``max_tokens`` tokens after ``text`` with their top logprobs."""
    if route == "chat":
        return {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "logprobs": True,
            "top_logprobs": top_logprobs,
        }
    return {"prompt": text, "max_tokens": max_tokens, "logprobs": top_logprobs}


async def ask_tokens(
    pipeline: Pipeline,
    method: str,
    route: Route,
    text: str,
    *,
    max_tokens: int,
    top_logprobs: int,
    completion_suffix: str = "",
) -> tuple[Call, list[TokenLogprob]]:
    """Ask ``text`` as a user message (``chat``) or a raw prompt with ``completion_suffix``
    (``completions``); the call and its generated tokens. Refuses an answer without logprobs."""
    if route == "completions":
        text += completion_suffix
    body = prompt_body(route, text, max_tokens=max_tokens, top_logprobs=top_logprobs)
    c = await call(pipeline, ROUTES[route], body)
    tokens = generated_tokens(c.choice)
    endpoint = getattr(pipeline.backend, "endpoint", "")
    require_logprobs(tokens, endpoint=endpoint, route=ROUTES[route], method=method)
    return c, tokens


def answer_text(c: Call) -> str:
    if "message" in c.choice:
        return str((c.choice.get("message") or {}).get("content") or "")
    return str(c.choice.get("text") or "")


def trace_of(
    c: Call,
    *,
    round_index: int,
    docids: list[str],
    answer: str,
    permutation: list[int],
    repair: RepairReport | None = None,
    score: float | None = None,
) -> WindowTrace:
    """One trace entry per call, so that usage counts every call."""
    return WindowTrace(
        round=round_index,
        docids=docids,
        answer=answer,
        permutation=permutation,
        repair=repair or RepairReport(),
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        latency_s=c.latency_s,
        queued_seconds=c.queued_s,
        retries=c.retries,
        cached=c.cached,
        score=score,
    )


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)} (got {value!r})")


def check_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1 (got {top_k}); leave it out for all")


def cut(pipeline: Pipeline, text: str, title: str | None = None, limit: int | None = None) -> str:
    """A passage (with its title) cut to ``limit`` tokens (the budget's ``max_passage_tokens``)."""
    from permrank.core.prompts import as_data

    limit = pipeline.budget.max_passage_tokens if limit is None else limit
    body = as_data(pipeline.tokenizer.truncate(text, limit))
    return f"{as_data(pipeline.tokenizer.truncate(title, limit))}: {body}" if title else body


def fill_prompt(prompt: str, pipeline: Pipeline, query: Query, **passages: Candidate) -> str:
    """``prompt`` with its ``{query}`` and one field per named passage (``passage=c`` fills
    ``{passage}``), each passage cut to the budget; all of it as data."""
    from permrank.core.prompts import as_data

    cuts = {field: cut(pipeline, c.text, c.title) for field, c in passages.items()}
    return prompt.format(query=as_data(query.text), **cuts)


async def rerank_by_scores(scorer: PassageScorer, pipeline: Pipeline, request: Request) -> Ranking:
    """Score the first ``top_k`` candidates at once; order them by score (ties keep input
    order), the rest follow in input order."""
    started = time.perf_counter()
    n = len(request.candidates)
    m = n if scorer.top_k is None else min(scorer.top_k, n)
    results = await all_or_none(
        scorer.score(pipeline, request.query, c) for c in request.candidates[:m]
    )
    scores = [s for s, _ in results]
    order = sorted(range(m), key=lambda i: (-scores[i], i)) + list(range(m, n))
    trace = [t for _, traces in results for t in traces]
    return ranking_of(request, order, trace, 1 if m else 0, started)
