"""The rerank API server: ``create_app(reranker_factory, options)`` -> a FastAPI app.

Every request is reranked by ONE engine (a ``permrank.Reranker`` made by the factory when
the app starts, closed when it stops): the windows of all requests in flight share its backend,
so they are sent together within the endpoint's concurrency, and a request with many windows
holds no other. Bad requests are refused with a 4xx JSON error naming the field before any model
call; an upstream failure is a 502 (503 when the endpoint is unreachable), never a made-up order.

Why ~490 lines: the routes of three API shapes (Cohere/Jina, TEI, the page's trace), their error
handlers and the shared engine's life cycle belong to one FastAPI app; the request and response
models are in ``schemas.py``.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from permrank.core.errors import BackendError, ConfigError, EndpointUnavailable, PermrankError
from permrank.core.strategies import STRATEGIES, describe_strategy, get_strategy
from permrank.core.types import Candidate, Query, Ranking
from permrank.core.types import Request as RerankInput
from permrank.engine.methods import get_method
from permrank.engine.methods.score import SCORING_METHODS, relevance_scores
from permrank.engine.pipeline import Pipeline, rerank_request
from permrank.engine.reranker import Reranker
from permrank.service.schemas import (
    DocumentOut,
    RerankRequest,
    RerankResponse,
    RerankResult,
    TeiRequest,
    TeiResult,
    TraceRequest,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServiceOptions:
    """How the server behaves, apart from the engine."""

    model_names: list[str] = dataclasses.field(default_factory=list)
    """Names ``model`` may take (``/v1/models``); the engine's model name is always one."""
    max_documents: int = 1000
    max_request_bytes: int = 2_000_000
    api_key_env: str | None = None
    """Environment variable holding the key clients must send as ``Bearer`` (none: open)."""
    page: bool = True


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.kind = kind or ("invalid_request_error" if status < 500 else "upstream_error")


def error_body(status: int, message: str, field: str | None, kind: str) -> dict[str, Any]:
    """One error shape for every route: Cohere's top-level ``message`` and OpenAI's ``error``."""
    return {
        "message": message,
        "field": field,
        "error": {"message": message, "type": kind, "field": field, "code": status},
    }


def error_response(
    status: int, message: str, field: str | None = None, kind: str = ""
) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "upstream_error")
    return JSONResponse(error_body(status, message, field, kind), status_code=status)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with a 413, before it is parsed (by its
    Content-Length, else while it streams in)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body is over --max-request-bytes ({self.limit} bytes); send fewer "
            "or shorter documents"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(413, message, "body")(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            event = await receive()
            if event["type"] == "http.request":
                seen += len(event.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, message, "body")
            return event

        try:
            await self.app(scope, limited, send)
        except ApiError as exc:
            await error_response(exc.status, exc.message, exc.field)(scope, receive, send)


def document_text(document: str | dict[str, Any], i: int, rank_fields: list[str] | None) -> str:
    if isinstance(document, str):
        return document
    if rank_fields:
        parts = [f"{f}: {document[f]}" for f in rank_fields if document.get(f) is not None]
        if parts:
            return "\n".join(parts)
        raise ApiError(422, f"documents[{i}] has none of rank_fields {rank_fields}", "documents")
    text = document.get("text")
    if not isinstance(text, str):
        raise ApiError(
            422,
            f'documents[{i}].text: an object document needs a "text" string (or give rank_fields)',
            f"documents[{i}].text",
        )
    return text


def moved(ranking: Ranking) -> list[dict[str, Any]]:
    """Each candidate in the new order, with where it was and how far it moved."""
    rows = []
    for new, c in enumerate(ranking.candidates):
        old = int(c.docid)
        rows.append({"index": old, "old_rank": old, "new_rank": new, "moved": old - new})
    return rows


def validated(model: type[Any], data: Any) -> Any:
    """``data`` as ``model``, or the validation error the other routes give."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def create_app(
    reranker_factory: Callable[[], Reranker | Awaitable[Reranker]] | Reranker,
    options: ServiceOptions | None = None,
) -> FastAPI:
    """The rerank API over the engine ``reranker_factory`` makes when the app starts."""
    options = options or ServiceOptions()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        made = reranker_factory() if callable(reranker_factory) else reranker_factory
        if not isinstance(made, Reranker):
            made = await made
        state["reranker"] = made
        state["variants"] = {}
        try:
            yield
        finally:
            await made.aclose()

    app = FastAPI(
        title="permrank rerank API",
        version="1",
        description="Listwise LLM reranking behind Cohere's, Jina's and TEI's rerank APIs. "
        "relevance_score: for listwise methods 1 - rank/n (rank-derived); for scoring methods "
        "(score, pointwise, likelihood) the model's own score; always strictly decreasing.",
        lifespan=lifespan,
    )

    def reranker() -> Reranker:
        return state["reranker"]

    def names() -> list[str]:
        found = [reranker().pipeline.backend.model, *options.model_names, "permrank"]
        return list(dict.fromkeys(n for n in found if n))

    def method_name(pipeline: Pipeline) -> str:
        return pipeline.method.name if pipeline.method is not None else "listwise"

    # -- errors: one JSON shape, the field named ---------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.field, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(
                400, f"the body is not valid JSON: {first.get('msg')}", "body", "invalid_json"
            )
        field = ".".join(loc) or "body"
        if first.get("type") == "missing":
            message = f"{field}: required field missing"
        else:
            message = f"{field}: {first.get('msg')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(422, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable) -> Any:
        if options.api_key_env and request.url.path not in ("/health", "/", "/favicon.ico"):
            key = os.environ.get(options.api_key_env, "")
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            right = scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key)
            if not key or not right:  # an empty key lets no one in
                return error_response(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authorization",
                    "authentication_error",
                )
        return await call_next(request)

    # -- the engine ----------------------------------------------------------------------------
    def check_model(model: str | None) -> None:
        if model is not None and model not in names():
            raise ApiError(
                404,
                f"unknown model {model!r}; this server serves {', '.join(names())} "
                "(GET /v1/models)",
                "model",
                "model_not_found",
            )

    def check_count(n: int, field: str) -> None:
        if n > options.max_documents:
            raise ApiError(
                413,
                f"{field}: {n} documents is more than --max-documents ({options.max_documents})",
                field,
            )

    async def rerank(pipeline: Pipeline, query: str, texts: list[str]) -> Ranking:
        request = RerankInput(
            query=Query(qid=uuid.uuid4().hex[:12], text=query),
            candidates=[Candidate(docid=str(i), text=t) for i, t in enumerate(texts)],
        )
        try:
            return await rerank_request(pipeline, request)
        except EndpointUnavailable as exc:
            raise ApiError(503, f"the model endpoint is unavailable: {exc}", None) from None
        except BackendError as exc:
            raise ApiError(502, f"the model endpoint failed: {exc}", None) from None
        except (ConfigError, PermrankError) as exc:
            raise ApiError(422, f"cannot rerank this request: {exc}", None) from None

    def variant(
        strategy: str | None, method: str | None, window: int | None, step: int | None
    ) -> Any:
        base = reranker().pipeline
        key = (strategy, method, window, step)
        if key == (None, None, None, None):
            return base
        found = state["variants"].get(key)
        if found is not None:
            return found
        pipeline = base
        try:
            if strategy is not None or window is not None or step is not None:
                name = strategy or strategy_name(base)
                size = window or getattr(base.strategy, "window_size", None)
                params: dict[str, Any] = {"window_size": size}
                if step is not None:
                    params["step"] = step
                pipeline = dataclasses.replace(pipeline, strategy=get_strategy(name, **params))
            if method is not None and method != method_name(base):
                pipeline = dataclasses.replace(pipeline, method=get_method(method))
        except ConfigError as exc:
            field = "method" if "method" in str(exc) else "strategy"
            raise ApiError(422, str(exc), field) from None
        state["variants"][key] = pipeline
        return pipeline

    async def rerank_api(body: RerankRequest, version: str) -> dict[str, Any]:
        check_model(body.model)
        check_count(len(body.documents), "documents")
        texts = [document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
        pipeline = reranker().pipeline
        ranking = await rerank(pipeline, body.query, texts)
        scores = relevance_scores(ranking, method_name(pipeline) in SCORING_METHODS)
        results = []
        for candidate, score in zip(ranking.candidates, scores, strict=True):
            index = int(candidate.docid)
            document = DocumentOut(text=texts[index]) if body.return_documents else None
            results.append(RerankResult(index=index, relevance_score=score, document=document))
        if body.top_n:
            results = results[: body.top_n]
        usage = ranking.usage
        response = RerankResponse(
            id=ranking.query.qid,
            model=body.model or names()[0],
            results=results,
            usage={
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            meta={
                "api_version": {"version": version},
                "billed_units": {
                    "search_units": 1,
                    "input_tokens": usage.prompt_tokens,
                    "output_tokens": usage.completion_tokens,
                },
                "tokens": {
                    "input_tokens": usage.prompt_tokens,
                    "output_tokens": usage.completion_tokens,
                },
                "permrank": {
                    "calls": usage.calls,
                    "cached_calls": usage.cached_calls,
                    "rounds": usage.rounds,
                    "seconds": round(ranking.seconds, 4),
                    "method": method_name(pipeline),
                },
            },
        )
        return response.model_dump(exclude_none=True)

    # -- routes --------------------------------------------------------------------------------
    @app.post("/v1/rerank", tags=["rerank"], summary="Cohere v1 / Jina rerank")
    async def rerank_v1(body: RerankRequest) -> dict[str, Any]:
        return await rerank_api(body, "1")

    @app.post("/v2/rerank", tags=["rerank"], summary="Cohere v2 rerank")
    async def rerank_v2(body: RerankRequest) -> dict[str, Any]:
        return await rerank_api(body, "2")

    both_shapes = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [TeiRequest.model_json_schema(), RerankRequest.model_json_schema()]
                    }
                }
            },
        }
    }

    @app.post(
        "/rerank",
        tags=["rerank"],
        summary="TEI rerank (texts); with documents instead, Jina's as vLLM serves it here",
        response_model=list[TeiResult] | RerankResponse,
        response_model_exclude_none=True,
        openapi_extra=both_shapes,
    )
    async def rerank_tei(request: Request) -> Any:
        try:
            data = await request.json()
        except ValueError as exc:
            message = f"the body is not valid JSON: {exc}"
            raise ApiError(400, message, "body", "invalid_json") from None
        if isinstance(data, dict) and "documents" in data and "texts" not in data:
            return await rerank_api(validated(RerankRequest, data), "1")
        body = validated(TeiRequest, data)
        check_model(body.model)
        check_count(len(body.texts), "texts")
        pipeline = reranker().pipeline
        ranking = await rerank(pipeline, body.query, body.texts)
        scores = relevance_scores(ranking, method_name(pipeline) in SCORING_METHODS)
        out = []
        for candidate, score in zip(ranking.candidates, scores, strict=True):
            index = int(candidate.docid)
            item = TeiResult(
                index=index, score=score, text=body.texts[index] if body.return_text else None
            )
            out.append(item.model_dump(exclude_none=True))
        return out

    @app.get("/v1/models", tags=["service"])
    async def models() -> dict[str, Any]:
        engine = reranker()
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "permrank",
                    "upstream": engine.pipeline.backend.model,
                    "strategy": strategy_name(engine.pipeline),
                    "method": method_name(engine.pipeline),
                }
                for name in names()
            ],
        }

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": reranker().pipeline.backend.model}

    @app.post("/v1/trace", tags=["page"], summary="rerank and return every window")
    async def trace(body: TraceRequest) -> dict[str, Any]:
        check_count(len(body.documents), "documents")
        texts = [document_text(d, i, None) for i, d in enumerate(body.documents)]
        pipeline = variant(body.strategy, body.method, body.window_size, body.step)
        ranking = await rerank(pipeline, body.query, texts)
        scores = relevance_scores(ranking, method_name(pipeline) in SCORING_METHODS)
        rows = moved(ranking)
        for row, score in zip(rows, scores, strict=True):
            row["relevance_score"] = score
            row["text"] = texts[row["index"]]
        return {
            "strategy": {"name": strategy_name(pipeline), **describe_strategy(pipeline.strategy)},
            "method": method_name(pipeline),
            "uses_strategy": method_name(pipeline) in ("listwise", "first"),
            "order": rows,
            "windows": [
                {
                    "round": t.round,
                    "indices": [int(d) for d in t.docids],
                    "answer": t.answer,
                    "permutation": t.permutation,
                    "repairs": t.repair.kinds(),
                    "score": t.score,
                    "prompt_tokens": t.prompt_tokens,
                    "completion_tokens": t.completion_tokens,
                    "latency_s": round(t.latency_s, 4),
                    "cached": t.cached,
                }
                for t in ranking.trace
            ],
            "usage": ranking.usage.model_dump(),
            "seconds": round(ranking.seconds, 4),
        }

    @app.get("/v1/samples", tags=["page"], summary="the bundled DL19 sample queries")
    async def samples() -> dict[str, Any]:
        return json.loads(_static("dl19-sample.json"))

    @app.get("/v1/options", tags=["page"], summary="strategies and methods the page offers")
    async def page_options() -> dict[str, Any]:
        from permrank.engine.methods import METHOD_NAMES

        pipeline = reranker().pipeline
        current = strategy_name(pipeline)
        return {
            "strategies": sorted(STRATEGIES),
            "methods": list(METHOD_NAMES),
            "strategy": current,
            "method": method_name(pipeline),
            "window_size": getattr(pipeline.strategy, "window_size", None),
            "model": reranker().pipeline.backend.model,
        }

    if options.page:

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page() -> str:
            return _static("page.html")

    app.add_middleware(BodyLimit, limit=options.max_request_bytes)
    return app


def strategy_name(pipeline: Pipeline) -> str:
    found = (k for k, v in STRATEGIES.items() if type(pipeline.strategy) is v)
    return next(found, type(pipeline.strategy).__name__)


def _static(name: str) -> str:
    return resources.files("permrank.service").joinpath("static", name).read_text("utf-8")
