"""Start-up: building the ``permrank`` parser loads nothing heavy that a command does not use.

Each check runs in a fresh interpreter (``sys.modules`` of this one is full of everything).
The figures themselves are measured by ``bench/bench_startup.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("openai", "tiktoken", "aiohttp", "ir_measures", "fastapi", "ray", "torch", "httpx")


def loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``heavy`` top-level packages in ``sys.modules`` after ``code`` runs in a new
    process."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


# ``permrank`` itself replaced by a bare package object: what the CLI modules import themselves,
# whatever ``permrank/__init__.py`` imports.
BARE_PACKAGE = f"""
import sys, types
pkg = types.ModuleType("permrank")
pkg.__path__ = [{str(REPO / "permrank")!r}]
pkg.__version__ = "0"
sys.modules["permrank"] = pkg
"""


def test_the_cli_modules_build_every_parser_without_heavy_imports() -> None:
    code = BARE_PACKAGE + "import permrank.cli.main as m\nm.build_parser()"
    # not even the pydantic models or tqdm: the parsers need neither
    assert loaded_after(code, HEAVY + ("pydantic", "tqdm")) == []


def test_import_permrank_cli_main_loads_nothing_heavy() -> None:
    eager = loaded_after("import permrank")
    if eager:
        pytest.skip(f"permrank/__init__.py imports {eager} (made lazy on another branch)")
    assert loaded_after("import permrank.cli.main as m\nm.build_parser()") == []


def test_the_method_choices_of_the_cli_are_the_engine_methods() -> None:
    from permrank.cli.rerank import METHOD_NAMES as CLI_NAMES
    from permrank.engine.methods import METHOD_NAMES

    assert tuple(CLI_NAMES) == tuple(METHOD_NAMES)
