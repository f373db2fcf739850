"""The page at `/` of `permrank serve api`, in a real headless browser (Debian's chromium).

The page is loaded with a link that picks the first bundled DL19 query and runs it; the browser
executes the page's own JavaScript against the running server. The DOM it ends with must show
the new order (every passage once, the noiseless judge's grades best first where the windows
reach), each window's answer and repairs, and the cost; a screenshot is taken and kept.

chromium is installed when missing in CI (CI=true, as root: apt-get); elsewhere the test is
skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from service_support import serve  # noqa: E402

from permrank.sim.server import Corpus, Simulator

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not IN_CI or os.geteuid() != 0:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "chromium"], check=True, env=env, capture_output=True
    )
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium, but it is not on PATH"
    return found


def browse(browser: str, url: str, *how: str) -> str:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,2400",
        "--virtual-time-budget=30000",
        *how,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Tables(HTMLParser):
    """The text of every table row by table id, and of elements with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.by_id: dict[str, str] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._ids: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        if a.get("id"):
            self._ids.append((a["id"] or "", tag, []))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.rows.setdefault(self._table, []).append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        if self._ids and self._ids[-1][1] == tag:
            name, _, text = self._ids.pop()
            self.by_id[name] = "".join(text).strip()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, text in self._ids:
            text.append(data)


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    corpus = Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")
    with Simulator(corpus) as sim, serve(sim.base_url, cache=None) as running:
        yield running.url


def test_page_reranks_a_sample_query_in_a_real_browser(page_url: str, tmp_path: Path) -> None:
    browser = chromium()
    url = f"{page_url}/?sample=0&strategy=sliding&method=listwise&window=10&run=1"
    dom = browse(browser, url, "--dump-dom")
    page = Tables()
    page.feed(dom)
    assert page.by_id.get("error", "") == ""
    order = [r for r in page.rows["order"] if r and r[0] != "new"]
    assert [int(r[0]) for r in order] == list(range(1, 21))
    assert sorted(int(r[1]) for r in order) == list(range(1, 21))  # every passage, once
    grades = [int(r[4] or 0) for r in order]  # blank: not judged
    assert grades[:4] == sorted(grades[:4], reverse=True) and grades[0] == max(grades)
    moved = [r[2] for r in order]
    assert any(m.startswith("\u25b2") for m in moved) and any(m.startswith("\u25bc") for m in moved)
    scores = [float(r[3]) for r in order]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    windows = [r for r in page.rows["windows"] if r and r[0] != "#"]
    assert len(windows) == 2  # 20 passages, windows of 10 moving by 10
    assert all(re.fullmatch(r"(\[\d+\] > )+\[\d+\]", w[3]) for w in windows)
    assert all(w[4] == "ok" for w in windows)
    assert re.search(
        r"listwise with sliding: 2 calls .* prompt \+ \d+ completion", page.by_id["cost"]
    )

    shot = tmp_path / "page.png"
    browse(browser, url, f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    keep = os.environ.get("PERMRANK_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "permrank-page.png")


def test_page_shows_a_bad_request_as_an_error(page_url: str) -> None:
    browser = chromium()
    dom = browse(browser, f"{page_url}/?strategy=sliding&run=1", "--dump-dom")
    page = Tables()
    page.feed(dom)
    assert "HTTP 422" in page.by_id["error"] and "query" in page.by_id["error"]
