"""permrank: listwise reranking with large language models.

    from permrank import Reranker, TopDownPartition, rank
    ranking = rank("how long is the life cycle of a flea", passages,
                   model="Qwen/Qwen2.5-7B-Instruct", base_url="http://127.0.0.1:8000/v1")
    ranking.candidates  # most relevant first

    with Reranker(model, base_url, strategy=TopDownPartition(top_n=10)) as reranker:
        rankings = reranker.rerank_batch([(query, passages), ...])

Importing ``permrank`` is light: each name below is imported when first used (PEP 562), so a
program that only parses permutations never loads the engine, the backends or pydantic models it
does not use. Old module paths (``permrank.rerank``, ``permrank.strategies``, ...) still import
(``permrank._aliases``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from permrank import _aliases

_aliases.install()

_EXPORTS: dict[str, str] = {
    # the API
    "Reranker": "permrank.engine.reranker",
    "rank": "permrank.engine.reranker",
    "Sampling": "permrank.engine.pipeline",
    "Limits": "permrank.engine.pipeline",
    "Budget": "permrank.engine.pipeline",
    "PromptBudget": "permrank.core.prompts",
    # strategies and methods
    "SlidingWindow": "permrank.core.strategies",
    "Tournament": "permrank.core.strategies",
    "TopDownPartition": "permrank.core.strategies",
    "SelfConsistency": "permrank.core.strategies",
    "Strategy": "permrank.core.strategies",
    "get_strategy": "permrank.core.strategies",
    "run_plan": "permrank.core.strategies",
    "get_method": "permrank.engine.methods",
    # types
    "Candidate": "permrank.core.types",
    "Query": "permrank.core.types",
    "Ranking": "permrank.core.types",
    "RepairReport": "permrank.core.types",
    "Request": "permrank.core.types",
    "Usage": "permrank.core.types",
    "WindowTrace": "permrank.core.types",
    # errors
    "PermrankError": "permrank.core.errors",
    "ConfigError": "permrank.core.errors",
    "InputError": "permrank.core.errors",
    "BackendError": "permrank.core.errors",
    "EndpointUnavailable": "permrank.core.errors",
    "TemplateError": "permrank.core.errors",
    # the pure helpers
    "load_template": "permrank.core.prompts",
    "parse_permutation": "permrank.core.parse",
}

__all__ = [
    "BackendError",
    "Budget",
    "Candidate",
    "ConfigError",
    "EndpointUnavailable",
    "InputError",
    "Limits",
    "PermrankError",
    "PromptBudget",
    "Query",
    "Ranking",
    "RepairReport",
    "Request",
    "Reranker",
    "Sampling",
    "SelfConsistency",
    "SlidingWindow",
    "Strategy",
    "TemplateError",
    "TopDownPartition",
    "Tournament",
    "Usage",
    "WindowTrace",
    "__version__",
    "get_method",
    "get_strategy",
    "load_template",
    "parse_permutation",
    "rank",
    "run_plan",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from permrank.core.errors import (
        BackendError,
        ConfigError,
        EndpointUnavailable,
        InputError,
        PermrankError,
        TemplateError,
    )
    from permrank.core.parse import parse_permutation
    from permrank.core.prompts import PromptBudget, load_template
    from permrank.core.strategies import (
        SelfConsistency,
        SlidingWindow,
        Strategy,
        TopDownPartition,
        Tournament,
        get_strategy,
        run_plan,
    )
    from permrank.core.types import (
        Candidate,
        Query,
        Ranking,
        RepairReport,
        Request,
        Usage,
        WindowTrace,
    )
    from permrank.engine.methods import get_method
    from permrank.engine.pipeline import Budget, Limits, Sampling
    from permrank.engine.reranker import Reranker, rank

    __version__: str


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from permrank.core.version import version

        return version()
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    old = f"{__name__}.{name}"
    if _aliases.resolve(old) is not None:  # ``permrank.rerank`` and the other old modules
        return importlib.import_module(old)
    raise AttributeError(f"module 'permrank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
