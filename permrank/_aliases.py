"""Old module paths that keep working: ``import permrank.rerank`` is ``permrank.engine.reranker``.

``ALIASES`` maps each moved module (or package) to where it lives now; a package's submodules
follow it (``permrank.commands.rerank`` is ``permrank.cli.rerank``), the longest old name
winning. ``install()`` (called by ``import permrank``) puts ``AliasFinder`` first on
``sys.meta_path``: importing an old name imports the new module and binds the old name to that
same module object, so both paths give the same classes and functions. Nothing is imported until
an old name is (the simulator stays unloaded unless an old ``permrank.sim*`` path is used).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

ALIASES: dict[str, str] = {
    "permrank.commands": "permrank.cli",
    "permrank.constrain": "permrank.core.constrain",
    "permrank.errors": "permrank.core.errors",
    "permrank.parse": "permrank.core.parse",
    "permrank.prompts": "permrank.core.prompts",
    "permrank.strategies": "permrank.core.strategies",
    "permrank.tokens": "permrank.core.tokens",
    "permrank.types": "permrank.core.types",
    "permrank.methods": "permrank.engine.methods",
    "permrank.methods.logprobs": "permrank.core.logprobs",
    "permrank.rerank": "permrank.engine.reranker",
    "permrank.distill": "permrank.distill.labels",
    "permrank.losses": "permrank.distill.train.losses",
    "permrank.evaluate": "permrank.runs.evaluate",
    "permrank.io": "permrank.runs.io",
    "permrank.manifest": "permrank.runs.manifest",
    "permrank.runstore": "permrank.runs.store",
    "permrank.simulator": "permrank.sim.server",
    "permrank.simfaults": "permrank.sim.faults",
    "permrank.simmethods": "permrank.sim.methods",
    "permrank.simnoise": "permrank.sim.noise",
    "permrank.simrerank": "permrank.sim.rerank",
}
"""Old dotted name -> new dotted name. ``permrank.distill`` is both the new package and the old
module: its old names (``permrank.distill.X``) are served by the package itself (see
``permrank/distill/__init__.py``), so it is not resolved here."""

_SKIP = {"permrank.distill"}


def resolve(fullname: str) -> str | None:
    """The module an old dotted name now lives in, or None if ``fullname`` is not an old name."""
    if not fullname.startswith("permrank."):
        return None
    parts = fullname.split(".")
    for end in range(len(parts), 1, -1):
        old = ".".join(parts[:end])
        new = ALIASES.get(old)
        if new is not None and old not in _SKIP:
            return ".".join([new, *parts[end:]])
    return None


class _AliasLoader:
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites it; put back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the module stays what it is: its own name and spec

    def load_module(self, fullname: str) -> ModuleType:  # the old protocol, for type checkers
        return importlib.import_module(fullname)

    def get_code(self, fullname: str) -> Any:  # ``python -m`` an old name
        spec = importlib.util.find_spec(self.target)
        loader = spec.loader if spec else None
        return loader.get_code(self.target) if loader and hasattr(loader, "get_code") else None


class AliasFinder:
    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = resolve(fullname)
        if new is None or new == fullname:
            return None
        if importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): before the path finder, which would
    otherwise load an old package's submodule a second time under its old name."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())
