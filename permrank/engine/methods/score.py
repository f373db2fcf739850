"""Learned-head scores: the relevance a reranking model's head gives each passage, read through
the endpoint's rerank API (RankLLaMA, bge-reranker, Qwen3-Reranker, cross-encoders).

Servers expose such a head in three shapes (``api``):

- ``rerank``: Cohere's, Jina's and vLLM's ``POST {base_url}/rerank`` with ``query`` and
  ``documents``; the answer's ``results`` carry ``index`` and ``relevance_score``;
- ``tei``: Hugging Face Text Embeddings Inference's ``POST {root}/rerank`` with ``query`` and
  ``texts``; the answer is a list of ``{index, score}``;
- ``score``: vLLM's ``POST {base_url}/score`` with ``text_1`` (the query) and ``text_2`` (the
  passages); the answer's ``data`` carry ``index`` and ``score``;
- ``auto`` (default): the first of these the endpoint serves (a 4xx answer to one means "not
  this shape"; it is asked once, then remembered).

Passages go ``batch`` at a time (one request each, all in flight together within the
endpoint's concurrency), cut to the prompt budget's ``max_passage_tokens``. Every request goes
through the backend's ``request`` (its limits, retries and counting) and the response cache.
The candidates are ordered by score (ties keep the input order); the trace holds one entry per
request, its ``answer`` the JSON ``{"scores": [...]}`` parallel to its ``docids``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from permrank.core.errors import BackendError, ConfigError
from permrank.core.scores import rank_score
from permrank.core.types import Candidate, Ranking, RepairReport, Request, WindowTrace
from permrank.engine.methods.base import check_choice, check_top_k, cut, exchange, ranking_of

if TYPE_CHECKING:
    from permrank.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

APIS = ("auto", "rerank", "tei", "score")
AUTO_ORDER = ("rerank", "tei", "score")
_NOT_THIS_SHAPE = re.compile(r"HTTP (400|404|405|415|422)\b")


def server_root(endpoint: str) -> str:
    return endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint


def route_of(api: str, endpoint: str) -> str:
    """Where requests of shape ``api`` go: relative to the base URL, or the server root's."""
    if api == "tei":
        return f"{server_root(endpoint)}/rerank"
    return "/rerank" if api == "rerank" else "/score"


def body_of(api: str, model: str, query: str, texts: list[str]) -> dict[str, Any]:
    if api == "rerank":
        return {"model": model, "query": query, "documents": texts, "return_documents": False}
    if api == "tei":
        return {"query": query, "texts": texts, "return_text": False, "truncate": True}
    return {"model": model, "text_1": query, "text_2": texts}


def scores_of_answer(api: str, answer: Any, n: int, where: str) -> tuple[list[float], int]:
    """The ``n`` scores in an answer of shape ``api`` (by index), and its prompt tokens."""
    tokens = 0
    if api == "tei":
        items = answer
    elif isinstance(answer, dict):
        items = answer.get("results" if api == "rerank" else "data")
        usage = answer.get("usage") or {}
        meta = (answer.get("meta") or {}).get("billed_units") or {}
        tokens = int(
            usage.get("prompt_tokens") or usage.get("total_tokens") or meta.get("input_tokens") or 0
        )
    else:
        items = None
    key = "relevance_score" if api == "rerank" else "score"
    scores: list[float | None] = [None] * n
    for item in items if isinstance(items, list) else []:
        try:
            index, value = int(item["index"]), float(item[key])
        except (KeyError, TypeError, ValueError):
            continue
        if 0 <= index < n:
            scores[index] = value
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing or not isinstance(items, list):
        raise BackendError(
            f"{where}: the answer does not score every passage ({len(missing)} of {n} missing; "
            f"expected the {api!r} shape, got {json.dumps(answer)[:200]}). Check --score-api."
        )
    return [float(s) for s in scores if s is not None], tokens


@dataclass
class Score:
    """Relevance scores from the endpoint's learned head (see the module docstring)."""

    api: str = "auto"
    batch: int = 32
    top_k: int | None = None
    name: str = "score"
    _resolved: str | None = field(default=None, repr=False, compare=False)
    _lock: asyncio.Lock | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice(self.api, APIS, "score api")
        check_top_k(self.top_k)
        if self.batch < 1:
            raise ConfigError(f"score batch must be at least 1 (got {self.batch})")
        if self.api != "auto":
            self._resolved = self.api

    async def _ask(self, pipeline: Pipeline, api: str, query: str, texts: list[str]) -> tuple:
        """One request of shape ``api``: (scores, prompt tokens, latency, from cache)."""
        backend = pipeline.backend
        request = getattr(backend, "request", None)
        if request is None:
            raise ConfigError(
                f"backend {type(backend).__name__} cannot send raw requests; --method score "
                "needs an HTTP endpoint serving a rerank or score API"
            )
        endpoint = getattr(backend, "endpoint", "")
        route = route_of(api, endpoint)
        body = body_of(api, backend.model, query, texts)
        # Through the backend's response cache, if any (off the event loop, single flight).
        done = await exchange(pipeline, route, body)
        where = route if route.startswith("http") else f"{endpoint}{route}"
        scores, tokens = scores_of_answer(api, done.answer, len(texts), where)
        return scores, tokens, done.latency_s, done.cached

    async def _resolve(self, pipeline: Pipeline, query: str, texts: list[str]) -> tuple:
        """Find the shape the endpoint serves by asking the first batch in each in turn."""
        failures = []
        for api in AUTO_ORDER:
            try:
                result = await self._ask(pipeline, api, query, texts)
            except BackendError as exc:
                if not _NOT_THIS_SHAPE.search(str(exc)):
                    raise
                failures.append(f"{api}: {exc}")
                continue
            self._resolved = api
            log.info("score: the endpoint serves the %r API", api)
            return result
        raise BackendError(
            f"{getattr(pipeline.backend, 'endpoint', '')}: serves none of the rerank APIs "
            "(Cohere/Jina/vLLM /rerank, TEI /rerank, vLLM /score): "
            + "; ".join(failures)
            + ". Serve a reranking model (e.g. vLLM with a sequence-classification model), or "
            "choose another --method."
        )

    async def _batch(self, pipeline: Pipeline, query: str, batch: list[Candidate]) -> WindowTrace:
        texts = [cut(pipeline, c.text, c.title) for c in batch]
        if self._resolved is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._resolved is None:
                    result = await self._resolve(pipeline, query, texts)
                    return self._trace(batch, *result)
        result = await self._ask(pipeline, self._resolved, query, texts)
        return self._trace(batch, *result)

    @staticmethod
    def _trace(
        batch: list[Candidate], scores: list[float], tokens: int, latency: float, cached: bool
    ) -> WindowTrace:
        return WindowTrace(
            round=0,
            docids=[c.docid for c in batch],
            answer=json.dumps({"scores": scores}),
            permutation=sorted(range(len(batch)), key=lambda i: (-scores[i], i)),
            repair=RepairReport(),
            prompt_tokens=tokens,
            latency_s=latency,
            cached=cached,
        )

    async def rerank(self, pipeline: Pipeline, request: Request) -> Ranking:
        started = time.perf_counter()
        n = len(request.candidates)
        m = n if self.top_k is None else min(self.top_k, n)
        head = request.candidates[:m]
        query = request.query.text
        batches = [head[i : i + self.batch] for i in range(0, m, self.batch)]
        if batches and self._resolved is None:  # the first batch finds the API, then the rest
            trace = [await self._batch(pipeline, query, batches[0])]
            trace += await asyncio.gather(*(self._batch(pipeline, query, b) for b in batches[1:]))
        else:
            trace = list(await asyncio.gather(*(self._batch(pipeline, query, b) for b in batches)))
        scores = [s for t in trace for s in json.loads(t.answer)["scores"]]
        order = sorted(range(m), key=lambda i: (-scores[i], i)) + list(range(m, n))
        return ranking_of(request, order, trace, 1 if m else 0, started)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "api": self.api,
            "resolved_api": self._resolved,
            "batch": self.batch,
            "top_k": self.top_k,
        }


def trace_scores(ranking: Ranking) -> dict[str, float]:
    """The model's score of every candidate a scoring method scored, by docid: the learned
    head's (``score``) or the logprob score of a method scoring each passage alone
    (``pointwise``, ``likelihood``). Empty for listwise, first and pairwise."""
    found: dict[str, float] = {}
    for t in ranking.trace:
        if t.answer.startswith('{"scores"'):
            try:
                values = json.loads(t.answer)["scores"]
            except (ValueError, KeyError):
                continue
            found.update(zip(t.docids, (float(v) for v in values), strict=False))
        elif t.score is not None and len(t.docids) == 1:
            found[t.docids[0]] = t.score
    return found


SCORING_METHODS = ("score", "pointwise", "likelihood")
"""Methods that score each candidate; their relevance scores are the model's own."""


def relevance_scores(ranking: Ranking, model_scores: bool) -> list[float]:
    """One relevance score per candidate, in ranked order, strictly decreasing.

    ``model_scores`` false (listwise, first, pairwise): rank-derived, ``1 - rank / n``. True
    (``SCORING_METHODS``): the model's own score of each candidate (``trace_scores``); a tie is
    lowered by the smallest float step below the score before it, as is every candidate left
    unscored (beyond ``top_k``)."""
    n = len(ranking.candidates)
    found = trace_scores(ranking) if model_scores else {}
    out: list[float] = []
    for rank, candidate in enumerate(ranking.candidates):
        value = found.get(candidate.docid)
        if value is None or not math.isfinite(value):
            value = rank_score(rank, n, unit=True) if not found else -math.inf
        if out and value >= out[-1]:
            value = math.nextafter(out[-1], -math.inf)
        out.append(value)
    return out
