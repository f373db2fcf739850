"""The simulator's rerank APIs: a learned relevance head's scores from the qrels, with noise.

``permrank.sim.server`` hands these routes here, in the three shapes servers of reranking models
use (``permrank.engine.methods.score``):

- ``POST /v1/rerank`` (and ``/v2/rerank``; ``/rerank`` with ``documents``): Cohere's, Jina's and
  vLLM's shape, ``{model, query, documents, top_n?, return_documents?}`` answered with
  ``{results: [{index, relevance_score, document?}], usage, meta}``, best first;
- ``POST /rerank`` with ``texts``: TEI's shape, answered with a list of ``{index, score, text?}``;
- ``POST /v1/score`` (and ``/score``): vLLM's shape, ``{model, text_1, text_2}`` answered with
  ``{data: [{index, object: "score", score}], usage}`` in input order.

The query is found by its text, each document among its candidates by text (as prompts are);
the score is ``sigmoid(2 r - 3)``, ``r`` the passage's grade plus the simulator's Gaussian noise
(``permrank.sim.methods.relevance``): noiseless, a perfect scorer (ties: equal scores).
A document the simulator does not know scores as grade 0.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

from permrank.core.prompts import as_data
from permrank.core.tokens import default_tokenizer
from permrank.sim.methods import relevance
from permrank.sim.state import _norm, find_passages

if TYPE_CHECKING:
    from permrank.sim.state import SimulatorState

RERANK_PATHS = ("/v1/rerank", "/v2/rerank", "/rerank")
SCORE_PATHS = ("/v1/score", "/score")


def _text(document: Any) -> str:
    if isinstance(document, dict):
        return str(document.get("text") or "")
    return str(document)


def head_scores(state: SimulatorState, query: str, texts: list[str]) -> tuple[list[float], int]:
    """The simulated head's score of each text for ``query``, and the tokens it read."""
    q_norm = _norm(as_data(query))
    found = state.corpus.find_query(q_norm)
    tokenizer = default_tokenizer()
    tokens = 0
    scores = []
    for text in texts:
        shown = _norm(as_data(text))
        tokens += tokenizer.count(query) + tokenizer.count(text)
        grade = 0
        if found is not None:
            indices = find_passages(shown, found)
            if indices:
                grade = found.passages[indices[0]][2]
        key = hashlib.sha256(f"{q_norm}\n{shown}".encode()).hexdigest()
        r = relevance(grade, state.noise, key)
        scores.append(1.0 / (1.0 + math.exp(-(2.0 * r - 3.0))))
    with state.lock:
        state.requests += 1
        state.passages_shown += len(texts)
        if found is not None:
            state.per_query[found.qid] += 1
        else:
            state.unmatched += 1
    return scores, tokens


def bad(message: str) -> tuple[int, Any]:
    return 400, {"error": {"message": message, "type": "invalid_request_error"}}


def respond_rerank(state: SimulatorState, body: dict[str, Any], path: str) -> tuple[int, Any]:
    """(status, JSON answer) for a rerank or score request at ``path``."""
    if path in SCORE_PATHS:
        query, texts = body.get("text_1"), body.get("text_2")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(query, str) or not isinstance(texts, list):
            return bad("text_1 (a string) and text_2 (a list of strings) are required")
        scores, tokens = head_scores(state, query, [_text(t) for t in texts])
        return 200, {
            "id": f"score-sim{state.requests}",
            "object": "list",
            "created": int(time.time()),
            "model": body.get("model", state.model),
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    query = body.get("query")
    if not isinstance(query, str):
        return bad("query (a string) is required")
    if path == "/rerank" and "texts" in body:  # TEI
        texts = body.get("texts")
        if not isinstance(texts, list):
            return bad("texts (a list of strings) is required")
        scores, _ = head_scores(state, query, [_text(t) for t in texts])
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return 200, [
            {"index": i, "score": scores[i]}
            | ({"text": texts[i]} if body.get("return_text") else {})
            for i in order
        ]
    documents = body.get("documents")
    if not isinstance(documents, list):
        return bad("documents (a list) is required")
    texts = [_text(d) for d in documents]
    scores, tokens = head_scores(state, query, texts)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top_n = body.get("top_n")
    if isinstance(top_n, int) and top_n > 0:
        order = order[:top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.get("return_documents"):
            item["document"] = {"text": texts[i]}
        results.append(item)
    return 200, {
        "id": f"rerank-sim{state.requests}",
        "model": body.get("model", state.model),
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"search_units": 1, "input_tokens": tokens}},
    }
