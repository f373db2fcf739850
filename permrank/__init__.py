"""permrank: listwise reranking with large language models.

from permrank import Reranker
reranker = Reranker("Qwen/Qwen2.5-7B-Instruct", "http://127.0.0.1:8000/v1")
ranking = reranker.rank("how long is the life cycle of a flea", passages)
ranking.candidates  # most relevant first
"""

__version__ = "0.1.0"  # before the imports: modules below read it

from permrank.core.errors import (
    BackendError,
    ConfigError,
    EndpointUnavailable,
    InputError,
    PermrankError,
    TemplateError,
)
from permrank.core.parse import parse_permutation
from permrank.core.prompts import load_template
from permrank.core.strategies import SlidingWindow, get_strategy
from permrank.core.types import (
    Candidate,
    Query,
    Ranking,
    RepairReport,
    Request,
    Usage,
    WindowTrace,
)
from permrank.engine.reranker import Reranker

__all__ = [
    "BackendError",
    "Candidate",
    "ConfigError",
    "EndpointUnavailable",
    "InputError",
    "PermrankError",
    "Query",
    "Ranking",
    "Reranker",
    "RepairReport",
    "Request",
    "SlidingWindow",
    "TemplateError",
    "Usage",
    "WindowTrace",
    "get_strategy",
    "load_template",
    "parse_permutation",
]
