"""Request and response shapes of the rerank API: Cohere's and Jina's (``/v1/rerank``,
``/v2/rerank``), TEI's (``/rerank``), and the page's trace (``/v1/trace``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _query(value: str) -> str:
    if not value.strip():
        raise ValueError("the query is empty")
    return value


class RerankRequest(BaseModel):
    """Cohere's (v1, v2) and Jina's rerank request. Unknown fields are accepted and ignored
    (``max_chunks_per_doc``, ``max_tokens_per_doc``, ...)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a name of GET /v1/models (optional)")
    query: str = Field(description="the search query")
    documents: list[str | dict[str, Any]] = Field(
        min_length=1, description='passages: strings, or objects with a "text" field'
    )
    top_n: int | None = Field(
        None, ge=0, description="return only the best N (default, or 0 as vLLM sends: all)"
    )
    return_documents: bool = Field(False, description="include each document in its result")
    rank_fields: list[str] | None = Field(
        None, description="Cohere v1: fields of object documents read as the text, in order"
    )

    _check_query = field_validator("query")(_query)


class DocumentOut(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request (0-based)")
    relevance_score: float = Field(
        description="higher is more relevant; strictly decreasing with rank. Listwise methods: "
        "rank-derived, 1 - rank/n; scoring methods (score, pointwise, likelihood): the model's "
        "score (ties and unscored candidates lowered by the smallest float step)"
    )
    document: DocumentOut | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: dict[str, int]
    meta: dict[str, Any]


class TeiRequest(BaseModel):
    """TEI's rerank request (``raw_scores``, ``truncate`` ... accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    query: str
    texts: list[str] = Field(min_length=1)
    return_text: bool = False
    model: str | None = None

    _check_query = field_validator("query")(_query)


class TeiResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class TraceRequest(BaseModel):
    """What the page asks: a query, passages, and the strategy and method to use."""

    query: str
    documents: list[str | dict[str, Any]] = Field(min_length=1)
    strategy: str | None = Field(None, description="default: the server's")
    method: str | None = Field(None, description="default: the server's")
    window_size: int | None = Field(None, ge=2)
    step: int | None = Field(None, ge=1)

    _check_query = field_validator("query")(_query)
