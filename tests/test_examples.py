"""Every examples/*.py snippet the docs show runs as written and prints what the docs promise.

The docs include the examples' files whole (pymdownx.snippets: ``--8<-- "examples/NAME.py"``),
so what a reader copies is what runs here: each in its own process, from the repository's
folder, against a simulator started by the command the quickstart gives.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DL19 = ROOT.parent / "shared" / "data" / "trec-dl19"
SNIPPET = re.compile(r"""--8<--\s+["'](examples/[^"']+\.py)["']""")

NOT_RUN = {
    "examples/distill_example.py": "labels DL20, trains two cross-encoder students and evaluates "
    "them: about an hour on 2 CPU cores, needs the `example` extra; run it by hand as "
    "docs/distillation.md says",
}


def documented_examples() -> set[str]:
    """Examples included in a docs page or the README (draft), as paths from the root."""
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    found: set[str] = set()
    for page in pages:
        if page.exists():
            found.update(SNIPPET.findall(page.read_text(encoding="utf-8")))
    return found


def _quickstart(out: str) -> None:
    lines = out.splitlines()
    assert lines[0].startswith("1. (was 4) The life cycle of a flea"), out  # grade 3 first
    assert len([line for line in lines if re.match(r"\d\. \(was \d\) ", line)]) == 5, out
    assert re.search(r"^cost: 1 model call\(s\), 0 answered from a cache, \d+ prompt", out, re.M)


def _strategies(out: str) -> None:
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["sliding", "tournament", "tdpart"], out
    assert all(line.endswith("true top 10 first: True") for line in lines), out
    assert lines[0].startswith("sliding    9 rounds,  9 windows, 180 passages shown"), out
    assert lines[2].startswith("tdpart     3 rounds"), out


def _methods(out: str) -> None:
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["listwise", "pointwise", "pairwise"], out
    assert all("order [3, 4, 2, 1]" in line for line in lines), out  # by qrels grade
    assert "(1 model calls)" in lines[0] and "(4 model calls)" in lines[1], out


def _losses(out: str) -> None:
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["listnet_loss", "listmle_loss", "lambda_loss"]
    for line in lines:
        loss, first = re.search(r"^\S+\s+([0-9.]+)  gradient \[([-+0-9.]+),", line).groups()
        assert float(loss) > 0 and float(first) < 0, line  # descent raises the teacher's first
        assert line.endswith("padding 0.0"), line  # padding gets no gradient


def _batch(out: str) -> None:
    values = dict(re.findall(r"^nDCG@10 (first stage|reranked)\s+([0-9.]+)$", out, re.M))
    assert out.startswith("5 queries, "), out
    assert float(values["first stage"]) == pytest.approx(0.5720, abs=1e-4), out  # BM25
    assert float(values["reranked"]) > 0.9, out  # a noiseless judge


# How each example is run (its arguments; "{url}" is the simulator's base URL) and what it must
# print. A new example shown in the docs needs a line here.
RUNS: dict[str, tuple[list[str], Callable[[str], None]]] = {
    "examples/quickstart.py": (["{url}"], _quickstart),
    "examples/strategies.py": ([], _strategies),
    "examples/methods.py": (["{url}"], _methods),
    "examples/batch.py": (["{url}", str(DL19)], _batch),
    "examples/losses.py": ([], _losses),
}
NEEDS = {"examples/losses.py": "torch"}  # an extra's module; CI installs every extra


def test_the_docs_show_examples_and_each_is_run_or_excused() -> None:
    shown = documented_examples()
    assert {"examples/quickstart.py", "examples/strategies.py"} <= shown
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.py")}
    assert shown <= on_disk, f"docs include missing examples: {sorted(shown - on_disk)}"
    assert shown - set(NOT_RUN) <= set(RUNS), "a new example needs a line in RUNS"
    assert on_disk <= shown | set(NOT_RUN), f"examples no page shows: {on_disk - shown}"


def readme_snippets() -> list[tuple[str, str]]:
    """Python blocks of the README (and its draft) that talk to the quickstart's simulator."""
    found = []
    for page in (ROOT / "README.md",):
        if page.exists():
            blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
            found += [(page.name, b) for b in blocks if '"permrank-simulator"' in b]
    return found


@pytest.fixture(scope="module")
def simulator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``permrank simulate --data ../shared/data/trec-dl19`` on a free loopback port."""
    if not (DL19 / "candidates.jsonl").exists():
        if os.environ.get("CI"):
            pytest.fail(f"DL19 data missing at {DL19} (CI has ../shared/data beside the repo)")
        pytest.skip(f"DL19 data not found at {DL19}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp_path_factory.mktemp("simulator") / "stderr.txt"
    with open(log, "w") as stderr:  # a file, not a pipe nobody reads: the server never blocks
        server = subprocess.Popen(
            [sys.executable, "-m", "permrank", "simulate", "--data", str(DL19), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/v1", banner)
        assert found, f"no base URL in the simulator's first line: {banner!r}; {log.read_text()}"
        yield found.group(0)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("example", sorted(documented_examples() - set(NOT_RUN)))
def test_example_runs_as_written(example: str, request: pytest.FixtureRequest) -> None:
    args, check = RUNS[example]
    if example in NEEDS and importlib.util.find_spec(NEEDS[example]) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{example} needs {NEEDS[example]}, which CI installs")
        pytest.skip(f"{example} needs {NEEDS[example]} (an extra)")
    if any("{url}" in a for a in args):  # only these need the simulator
        url = request.getfixturevalue("simulator_url")
        args = [a.format(url=url) for a in args]
    result = subprocess.run(
        [sys.executable, example, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    check(result.stdout)


@pytest.mark.parametrize(
    "snippet",
    readme_snippets(),
    ids=[f"{name}-{i}" for i, (name, _) in enumerate(readme_snippets())],
)
def test_readme_python_runs_against_the_simulator(
    snippet: tuple[str, str], simulator_url: str, tmp_path: Path
) -> None:
    """As a reader pastes it, with the simulator at the quickstart's address (here: a free port)."""
    script = tmp_path / "snippet.py"
    script.write_text(snippet[1].replace("http://127.0.0.1:8000/v1", simulator_url))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "The life cycle of a flea" in result.stdout.splitlines()[0], result.stdout  # grade 3
