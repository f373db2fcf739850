"""The rerank API server (the ``server`` extra: FastAPI + uvicorn): ``permrank serve api``.

``create_app(reranker_factory, ServiceOptions(...))`` is the FastAPI app; the CLI
(``permrank.cli.serve``) builds the engine from the flags of ``permrank rerank``.
"""

from permrank.engine.methods.score import relevance_scores
from permrank.service.app import ServiceOptions, create_app

__all__ = ["ServiceOptions", "create_app", "relevance_scores"]
