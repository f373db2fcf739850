"""The rerank API server (the ``server`` extra: FastAPI + uvicorn): ``permrank serve api``.

``create_app(reranker_factory, ServiceOptions(...))`` is the FastAPI app; the CLI
(``permrank.commands.serve``) builds the engine from the flags of ``permrank rerank``.
"""

from ..methods.score import relevance_scores
from .app import ServiceOptions, create_app

__all__ = ["ServiceOptions", "create_app", "relevance_scores"]
