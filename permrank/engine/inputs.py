"""What the Python API accepts, normalised once at the edge: documents (strings, dicts,
``Candidate``s), requests (``Request``s, ``(query, documents)`` pairs, dicts) and the
``Reranker``'s option groups given beside their flat keywords."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from permrank.core.errors import ConfigError
from permrank.core.types import Candidate, Query, Request
from permrank.engine.pipeline import Method

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


def method_takes(method: str | Method, option: str) -> bool:
    if not isinstance(method, str):
        return False
    from permrank.core.registry import field_names
    from permrank.engine.methods import METHODS

    return option in field_names(METHODS[method]) if method in METHODS else False


def strategy_takes(strategy: str, option: str) -> bool:
    from permrank.core.registry import field_names
    from permrank.core.strategies import STRATEGIES

    return option in field_names(STRATEGIES[strategy]) if strategy in STRATEGIES else False


def option_group(name: str, group: Any, cls: type, **flat: Any) -> Any:
    """The option group ``group`` (a ``Sampling``, ``Limits`` or ``PromptBudget``), or one built
    from the flat keywords. A flat keyword given (not its default) with a different value than
    the group's is a ``ConfigError``: one of them would be silently ignored."""
    defaults = cls()
    if group is None:
        return cls(**flat)
    if not isinstance(group, cls):
        raise ConfigError(f"{name} must be a {cls.__name__} (got {type(group).__name__})")
    clashes = [
        f"{key}={value!r} against {name}.{key}={getattr(group, key)!r}"
        for key, value in flat.items()
        if value != getattr(defaults, key) and value != getattr(group, key)
    ]
    if clashes:
        raise ConfigError(
            f"Reranker got both {name}= and flat keywords that disagree: {'; '.join(clashes)}; "
            f"give each option once (in {name}= or as a keyword)"
        )
    return group


RequestLike = Request | tuple[str, Sequence[CandidateLike]] | dict[str, Any]


def to_request(item: RequestLike, index: int = 0) -> Request:
    """One query to rerank from a ``Request``, a ``(query, documents)`` pair or a dict
    ``{"query", "documents" or "candidates", "qid"?}``; documents as ``to_candidates`` takes."""
    if isinstance(item, Request):
        return item
    qid: Any = str(index)
    if isinstance(item, tuple | list) and len(item) == 2:
        query, documents = item
    elif isinstance(item, dict):
        data = dict(item)
        if "query" not in data or not ("documents" in data or "candidates" in data):
            raise ConfigError(
                f"request {index}: a dict needs 'query' and 'documents' (or 'candidates'); "
                f"got keys {sorted(data)}"
            )
        query = data.pop("query")
        documents = data.pop("documents") if "documents" in data else data.pop("candidates")
        qid = data.pop("qid", qid)
        if isinstance(query, dict):  # rank_llm's {"text", "qid"}
            qid = query.get("qid", qid)
            query = query.get("text", "")
    else:
        raise ConfigError(
            f"request {index}: expected a Request, a (query, documents) pair or a dict "
            f"with 'query' and 'documents' (got {type(item).__name__})"
        )
    if isinstance(query, Query):
        q = query
    elif isinstance(query, str):
        q = Query(qid=str(qid), text=query)
    else:
        raise ConfigError(f"request {index}: the query must be a string (got {query!r})")
    if isinstance(documents, str):
        raise ConfigError(f"request {index}: documents must be a list, not one string")
    return Request(query=q, candidates=to_candidates(documents))


def to_requests(items: Iterable[RequestLike]) -> Iterator[Request]:
    """``to_request`` of each item, lazily (a stream stays a stream)."""
    for i, item in enumerate(items):
        yield to_request(item, i)
