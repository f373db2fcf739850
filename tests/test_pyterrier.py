"""`first_stage >> PermRank(...)` in PyTerrier: DL19 against the simulator, in pt.Experiment, must
give the order the same pipeline gives through the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pt = pytest.importorskip("pyterrier")
pd = pytest.importorskip("pandas")
from ir_measures import nDCG  # noqa: E402

from permrank.cli.main import main  # noqa: E402
from permrank.pyterrier import PermRank  # noqa: E402
from permrank.runs.evaluate import read_qrels  # noqa: E402
from permrank.runs.io import read_requests  # noqa: E402
from permrank.sim.noise import Noise  # noqa: E402
from permrank.sim.server import Corpus, Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DL19_5Q = ROOT / "fixtures" / "dl19-5q"
MODEL = "permrank-simulator"
DEPTH = 40


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_files(DL19_5Q / "candidates.jsonl", DL19_5Q / "qrels.txt")


@pytest.fixture(scope="module")
def sim(corpus: Corpus) -> Iterator[Simulator]:
    with Simulator(corpus, noise=Noise(swap=0.2, seed=3)) as running:
        yield running


@pytest.fixture(scope="module")
def bm25() -> pd.DataFrame:
    """The first stage: BM25's top DEPTH of each DL19 query, as PyTerrier frames them."""
    rows = []
    for request in read_requests(str(DL19_5Q / "candidates.jsonl")):
        for rank, c in enumerate(request.candidates[:DEPTH]):
            rows.append(
                {
                    "qid": request.query.qid,
                    "query": request.query.text,
                    "docno": c.docid,
                    "text": c.text,
                    "score": c.score,
                    "rank": rank,
                    "source": "bm25",
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def qrels() -> pd.DataFrame:
    grades = read_qrels(str(DL19_5Q / "qrels.txt"))
    rows = [(q, d, g) for q, docs in grades.items() for d, g in docs.items()]
    return pd.DataFrame(rows, columns=["qid", "docno", "label"])


def cli_order(tmp_path: Path, base_url: str) -> dict[str, list[str]]:
    output = tmp_path / "cli.jsonl"
    flags = ["--depth", str(DEPTH), "--no-cache", "-q", "--overwrite"]
    code = main(
        ["rerank", "--input", str(DL19_5Q / "candidates.jsonl"), "--output", str(output)]
        + ["--base-url", base_url, "--model", MODEL, *flags]
    )
    assert code == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    return {line["qid"]: [c["docid"] for c in line["candidates"]] for line in lines}


def test_experiment_gives_the_cli_order(
    sim: Simulator, bm25: pd.DataFrame, qrels: pd.DataFrame, tmp_path: Path
) -> None:
    first = pt.Transformer.from_df(bm25)
    pipeline = first >> PermRank(MODEL, sim.base_url, cache=None)
    topics = bm25[["qid", "query"]].drop_duplicates()
    table = pt.Experiment(
        [first, pipeline], topics, qrels, eval_metrics=[nDCG @ 10], names=["bm25", "permrank"]
    )
    scores = dict(zip(table["name"], table["nDCG@10"], strict=True))
    assert scores["permrank"] > scores["bm25"] + 0.1

    reranked = pipeline.transform(topics)
    expected = cli_order(tmp_path, sim.base_url)
    for qid, rows in reranked.groupby("qid"):
        rows = rows.sort_values("rank")
        assert list(rows["docno"]) == expected[qid]
        assert list(rows["rank"]) == list(range(DEPTH))  # rank 0 = highest score
        assert rows["score"].is_monotonic_decreasing and rows["score"].is_unique
        assert set(rows["source"]) == {"bm25"}  # other columns kept
    assert len(reranked) == len(bm25)
    assert set(zip(reranked["qid"], reranked["docno"], strict=True)) == set(
        zip(bm25["qid"], bm25["docno"], strict=True)
    )


def test_queries_of_a_frame_are_reranked_concurrently(corpus: Corpus, bm25: pd.DataFrame) -> None:
    latency = 0.3
    with Simulator(corpus, latency_s=latency) as slow:
        permrank = PermRank(MODEL, slow.base_url, cache=None)
        started = time.perf_counter()
        out = permrank.transform(bm25)
        seconds = time.perf_counter() - started
    windows = 5 * 3  # 5 queries x 3 sequential windows (20 moving by 10 over 40)
    assert len(out) == len(bm25)
    assert seconds < windows * latency / 2, f"{seconds:.2f} s: queries went one by one"


def test_a_frame_without_text_is_refused_naming_the_column(sim: Simulator) -> None:
    frame = pd.DataFrame([{"qid": "1", "query": "q", "docno": "d1"}])
    with pytest.raises(ValueError, match="lacks text"):
        PermRank(MODEL, sim.base_url).transform(frame)
