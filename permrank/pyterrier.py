"""permrank as a PyTerrier transformer (the ``pyterrier`` extra: PyTerrier 1.x, no Java).

``bm25 >> PermRank(model=..., base_url=...)`` reranks a first stage's results::

    import pyterrier as pt
    from permrank.pyterrier import PermRank

    first = pt.Transformer.from_df(bm25_frame)   # qid, query, docno, text, score, rank
    pipeline = first >> PermRank(model="qwen", base_url="http://127.0.0.1:8000/v1")
    pt.Experiment([first, pipeline], topics, qrels, eval_metrics=["nDCG@10"])

``PermRank(model, base_url, **options)`` takes every option of ``permrank.Reranker``
(``strategy``, ``window_size``, ``method``, ``prompt``, ``cache``, ``concurrency`` ...), or a ready
``reranker=``. Its ``transform`` takes a frame with ``qid``, ``query``, ``docno`` and ``text`` (the
column named by ``text_field``; ``title`` too when there is one), each query's candidates in
first-stage order (by ``rank`` when the frame has it, else by ``score`` descending, else as they
come), and returns every row with a new ``score`` and ``rank`` (rank 0 = highest score), best
first within each query, other columns kept. The queries of one frame are reranked concurrently
(within the endpoint's concurrency). ``score`` is the model's own for scoring methods, else
rank-derived (``permrank.engine.methods.score.relevance_scores``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyterrier as pt

from permrank.core.errors import ConfigError
from permrank.core.types import Candidate, Query, Request
from permrank.engine.methods.score import SCORING_METHODS, relevance_scores
from permrank.engine.reranker import Reranker

__all__ = ["PermRank"]


class PermRank(pt.Transformer):
    """Rerank each query's candidates with an LLM (see the module docstring)."""

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        *,
        reranker: Reranker | None = None,
        text_field: str = "text",
        **options: Any,
    ):
        super().__init__()
        if reranker is not None and (model or base_url or options):
            raise ConfigError("give either reranker= or model/base_url/options, not both")
        self.reranker = reranker or Reranker(model, base_url, **options)
        self.text_field = text_field

    def __repr__(self) -> str:
        pipeline = self.reranker.pipeline
        method = pipeline.method.name if pipeline.method is not None else "listwise"
        name = type(pipeline.strategy).__name__
        return f"PermRank({pipeline.backend.model!r}, {name}, {method})"

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in ("qid", "query", "docno", self.text_field) if c not in inp.columns]
        if missing:
            raise ConfigError(
                f"PermRank needs the columns qid, query, docno and {self.text_field}; this frame "
                f"lacks {', '.join(missing)} (has {', '.join(map(str, inp.columns))}). Add the "
                "passage text, e.g. `bm25 >> pt.text.get_text(dataset, 'text') >> PermRank(...)`"
            )
        frame = inp.reset_index(drop=True)
        if frame.empty:
            return frame.assign(score=pd.Series(dtype=float), rank=pd.Series(dtype=int))
        if "rank" in frame.columns:
            frame = frame.sort_values(["rank"], kind="stable")
        elif "score" in frame.columns:
            frame = frame.sort_values(["score"], ascending=False, kind="stable")
        qids = list(dict.fromkeys(frame["qid"]))  # queries in the order they come
        groups = {qid: rows for qid, rows in frame.groupby("qid", sort=False)}
        has_title = "title" in frame.columns
        requests = []
        for qid in qids:
            rows = groups[qid]
            candidates = [
                Candidate(
                    docid=str(position),
                    text=str(text),
                    title=str(title) if has_title and isinstance(title, str) else None,
                )
                for position, (text, title) in enumerate(
                    zip(
                        rows[self.text_field],
                        rows["title"] if has_title else [None] * len(rows),
                        strict=True,
                    )
                )
            ]
            query = Query(qid=str(qid), text=str(rows["query"].iloc[0]))
            requests.append(Request(query=query, candidates=candidates))
        rankings = self.reranker.rerank_batch(requests)  # concurrently, in input order
        chosen = self.reranker.pipeline.method
        method = chosen.name if chosen is not None else "listwise"
        parts = []
        for qid, ranking in zip(qids, rankings, strict=True):
            rows = groups[qid]
            order = [int(c.docid) for c in ranking.candidates]
            part = rows.iloc[order].copy()
            part["score"] = relevance_scores(ranking, method in SCORING_METHODS)
            part["rank"] = range(len(part))
            parts.append(part)
        return pd.concat(parts, ignore_index=True)
