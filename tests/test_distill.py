"""`permrank distill`: labels follow the teacher, resume after a kill, stats match records."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from permrank.cli.main import main
from permrank.core.errors import ConfigError
from permrank.core.types import Candidate, Query, Ranking, Request
from permrank.distill.labels import (
    GroupSampling,
    LabelOptions,
    LabelStore,
    PairSampling,
    group_ranks,
    query_labels,
    read_records,
    sample_pairs,
    teacher_requests,
)
from permrank.sim.server import Corpus, Noise, Simulator

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PERMRANK_DATA", ROOT.parent / "shared" / "data"))
DL20 = DATA / "trec-dl20"


def need_dl20() -> None:
    if not (DL20 / "candidates.jsonl").exists():
        if os.environ.get("CI"):
            pytest.fail(f"DL20 data missing at {DL20} (CI has ../shared/data beside the repo)")
        pytest.skip(f"DL20 data not found at {DL20}")


# -- pure sampling -----------------------------------------------------------------------------


def test_pair_rules_take_what_they_say() -> None:
    rng = random.Random(0)
    top = sample_pairs(30, PairSampling(rules=("top",), top=5), rng)
    assert sorted(top) == [(i, j) for i in range(5) for j in range(i + 1, 5)]
    adjacent = sample_pairs(30, PairSampling(rules=("adjacent",)), rng)
    assert adjacent == [(i, i + 1) for i in range(29)]
    drawn = sample_pairs(30, PairSampling(rules=("random",), top=4, below=20, samples=3), rng)
    assert len(drawn) == 4 * 3
    assert all(i < 4 and 20 <= j < 30 for i, j in drawn)
    both = sample_pairs(30, PairSampling(rules=("top", "adjacent"), top=5), rng)
    assert len(both) == len(set(both)) == 10 + 29 - 4  # the 4 adjacent pairs in the top 5 once


def test_short_lists_give_fewer_pairs_not_errors() -> None:
    rng = random.Random(0)
    assert sample_pairs(1, PairSampling(rules=("top", "adjacent", "random")), rng) == []
    drawn = sample_pairs(8, PairSampling(rules=("random",), top=3, below=5, samples=10), rng)
    assert sorted(drawn) == [(i, j) for i in range(3) for j in range(5, 8)]


def test_group_negatives_come_from_below_the_positives() -> None:
    rng = random.Random(1)
    positives, negatives = group_ranks(30, GroupSampling(positives=2, negatives=5), rng)
    assert positives == [0, 1]
    assert len(negatives) == 5 and min(negatives) >= 2
    positives, negatives = group_ranks(
        30, GroupSampling(positives=1, negatives=50, negatives_below=10), rng
    )
    assert negatives == list(range(10, 30))


def test_shuffled_runs_are_seeded_permutations_of_the_input() -> None:
    request = Request(
        query=Query(qid="q1", text="query"),
        candidates=[Candidate(docid=str(i), text=f"passage {i}") for i in range(12)],
    )
    runs = teacher_requests(request, shuffles=3, seed=7)
    orders = [[c.docid for c in r.candidates] for r in runs]
    assert orders[0] == [str(i) for i in range(12)]
    assert all(sorted(o, key=int) == orders[0] for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    again = [[c.docid for c in r.candidates] for r in teacher_requests(request, 3, 7)]
    assert again == orders


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown format"):
        LabelOptions(formats=("listwise", "triplets")).check()
    with pytest.raises(ConfigError, match="pair rule"):
        LabelOptions(pairs=PairSampling(rules=("neighbours",))).check()
    with pytest.raises(ConfigError, match="cannot rank above"):
        LabelOptions(groups=GroupSampling(positives=3, negatives_below=1)).check()


# -- the output folder -------------------------------------------------------------------------


def toy_ranking(qid: str, n: int = 8) -> Ranking:
    return Ranking(
        query=Query(qid=qid, text=f"query {qid}"),
        candidates=[Candidate(docid=f"{qid}-{i}", text=f"passage {qid} {i}") for i in range(n)],
    )


def test_uncommitted_records_and_torn_journal_lines_are_cut_on_resume(tmp_path: Path) -> None:
    options = LabelOptions(shard_size=3, pairs=PairSampling(rules=("adjacent",)))
    store = LabelStore.open(tmp_path, options)
    for qid in ("a", "b"):
        ranking = toy_ranking(qid)
        store.commit(query_labels([ranking], [ranking.docids], options))
    store.close()
    committed = {f: read_records(tmp_path, f) for f in options.formats}
    # A run killed after appending query c's records, and halfway through its journal line.
    with open(tmp_path / "pairwise-00004.jsonl", "a") as f:
        f.write('{"qid": "c", "pos": "x"}\n{"qid": "c", "po')
    with open(tmp_path / "pairwise-00005.jsonl", "a") as f:
        f.write('{"qid": "c"}\n')
    with open(tmp_path / "done.jsonl", "a") as f:
        f.write('{"qid": "c", "runs": 1, "rec')
    store = LabelStore.open(tmp_path, options)
    assert store.done == {"a", "b"}
    assert {f: read_records(tmp_path, f) for f in options.formats} == committed
    ranking = toy_ranking("c")
    store.commit(query_labels([ranking], [ranking.docids], options))
    stats = store.write_stats(input_queries=3)
    store.close()
    pairs = read_records(tmp_path, "pairwise")
    assert [p["qid"] for p in pairs] == ["a"] * 7 + ["b"] * 7 + ["c"] * 7
    assert stats["records"] == {"listwise": 3, "pairwise": 21, "grouped": 3}
    assert stats["complete"] is True
    assert all(len(read_records_file(tmp_path / name)) <= 3 for name in stats["shards"]["pairwise"])


def read_records_file(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_grouped_records_are_flagembedding_groups_by_default() -> None:
    ranking = toy_ranking("q", n=6)
    options = LabelOptions(groups=GroupSampling(positives=1, negatives=3, negatives_below=2))
    (group,) = query_labels([ranking], [ranking.docids], options).records["grouped"]
    assert set(group) == {"query", "pos", "neg"}
    assert group["query"] == "query q"
    assert group["pos"] == ["passage q 0"]
    assert set(group["neg"]) <= {f"passage q {i}" for i in range(2, 6)}
    assert len(set(group["neg"])) == 3
    # A list too short for any negative gives no group (FlagEmbedding needs one of each).
    short = toy_ranking("s", n=1)
    assert query_labels([short], [short.docids], options).records["grouped"] == []


def test_other_options_are_refused_on_resume(tmp_path: Path) -> None:
    LabelStore.open(tmp_path, LabelOptions(shard_size=5)).close()
    with pytest.raises(ConfigError, match="shard_size"):
        LabelStore.open(tmp_path, LabelOptions(shard_size=6))


# -- end to end on DL20 with the simulator -------------------------------------------------------


@pytest.fixture(scope="module")
def dl20_simulator():
    need_dl20()
    corpus = Corpus.from_dir(DL20)
    with Simulator(corpus, noise=Noise(swap=0.1, seed=3)) as sim:
        yield sim


def distill_args(sim: Simulator, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--input",
        str(DL20 / "candidates.jsonl"),
        "--out",
        str(out),
        "--base-url",
        sim.base_url,
        "--model",
        "permrank-simulator",
        "--depth",
        "30",
        "--augment",
        "1",
        "--pairs",
        "top,adjacent,random",
        "--pair-top",
        "5",
        "--pair-below",
        "15",
        "--pair-samples",
        "3",
        "--group-positives",
        "2",
        "--group-negatives",
        "7",
        "--group-scores",
        "--group-prompt",
        "Is the passage relevant to the query?",
        "--shard-size",
        "400",
        "-q",
        *extra,
    ]


@pytest.fixture(scope="module")
def dl20_labels(dl20_simulator, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dl20-labels")
    args = distill_args(dl20_simulator, out, "--qrels", str(DL20 / "qrels.txt"))
    assert main(args) == 0
    return out


def test_every_pair_and_group_follows_the_teacher_order(dl20_labels: Path) -> None:
    listwise = read_records(dl20_labels, "listwise")
    pairs = read_records(dl20_labels, "pairwise")
    groups = read_records(dl20_labels, "grouped")
    inputs = {
        r["qid"]: r for r in map(json.loads, (DL20 / "candidates.jsonl").read_text().splitlines())
    }
    assert {r["qid"] for r in listwise} == set(inputs)
    teacher: dict[tuple[str, int], list[str]] = {}
    for record in listwise:
        order = [c["docid"] for c in record["candidates"]]
        shown = record["input_order"]
        first_stage = [c["docid"] for c in inputs[record["qid"]]["candidates"][:30]]
        assert sorted(order) == sorted(shown) == sorted(first_stage)
        assert (shown == first_stage) == (record["run"] == 0)
        for window in record["windows"]:
            assert sorted(window["permutation"]) == list(range(len(window["docids"])))
            assert window["order"] == [window["docids"][p] for p in window["permutation"]]
        teacher[(record["qid"], record["run"])] = order
    assert len(teacher) == 2 * len(inputs)  # input order + one shuffle per query

    for pair in pairs:
        order = teacher[(pair["qid"], pair["run"])]
        pos, neg = order.index(pair["pos_docid"]), order.index(pair["neg_docid"])
        assert (pos + 1, neg + 1) == (pair["pos_rank"], pair["neg_rank"])
        assert pair["rank_gap"] == neg - pos > 0
        texts = {c["docid"]: c["text"] for c in inputs[pair["qid"]]["candidates"]}
        assert (pair["pos"], pair["neg"]) == (texts[pair["pos_docid"]], texts[pair["neg_docid"]])
    keys = [(p["qid"], p["run"], p["pos_docid"], p["neg_docid"]) for p in pairs]
    assert len(keys) == len(set(keys))

    # One group per teacher run, in the listwise records' order: FlagEmbedding's fields only.
    assert len(groups) == len(listwise)
    for group, record in zip(groups, listwise, strict=True):
        assert set(group) == {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt"}
        assert group["query"] == record["query"]
        texts = [c["text"] for c in record["candidates"]]
        assert group["pos"] == texts[:2]
        assert len(group["neg"]) == 7 and all(t in texts[2:] for t in group["neg"])
        assert all(isinstance(t, str) for t in group["pos"] + group["neg"])
        assert min(group["pos_scores"]) > max(group["neg_scores"])
        assert len(group["pos_scores"]) == 2 and len(group["neg_scores"]) == 7
        assert group["prompt"] == "Is the passage relevant to the query?"


def test_stats_count_the_records_on_disk(dl20_labels: Path) -> None:
    stats = json.loads((dl20_labels / "stats.json").read_text())
    counts = {f: len(read_records(dl20_labels, f)) for f in ("listwise", "pairwise", "grouped")}
    assert stats["records"] == counts
    assert stats["pairs"] == counts["pairwise"] and stats["groups"] == counts["grouped"]
    assert stats["queries"] == stats["input_queries"] == 54 and stats["complete"]
    assert stats["teacher_runs"] == counts["listwise"] == 108
    listed = sorted(name for names in stats["shards"].values() for name in names)
    on_disk = sorted(p.name for p in dl20_labels.glob("*-0*.jsonl"))
    assert listed == on_disk
    assert max(len(read_records_file(dl20_labels / n)) for n in on_disk) <= 400
    # The simulated teacher orders by grade with 10% adjacent swaps: it mostly agrees.
    agreement = stats["qrels_agreement"]
    assert agreement["queries"] == 54
    pairs = agreement["pairs"]
    assert 0 < pairs["agreeing"] <= pairs["judged"] <= counts["pairwise"]
    assert 0.8 < pairs["share"] < 1.0
    assert (dl20_labels / "manifest.json").exists()


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(dl20_simulator, dl20_labels, tmp_path) -> None:
    """SIGKILL a real ``permrank distill`` process mid-run; rerunning completes the same labels."""
    out = tmp_path / "labels"
    args = distill_args(dl20_simulator, out, "--qrels", str(DL20 / "qrels.txt"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dl20_simulator.state.latency_s = 0.05
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "permrank", *args, "--concurrency", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        journal = out / "done.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 10:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        dl20_simulator.state.latency_s = 0.0
    done_before = journal.read_text().count("\n")
    assert 10 <= done_before < 54
    assert not (out / "stats.json").exists()

    assert main(args) == 0
    for fmt in ("listwise", "pairwise", "grouped"):
        assert read_records(out, fmt) == read_records(dl20_labels, fmt), fmt
    listwise = read_records(out, "listwise")
    assert max(Counter((r["qid"], r["run"]) for r in listwise).values()) == 1
    resumed = json.loads((out / "stats.json").read_text())
    first = json.loads((dl20_labels / "stats.json").read_text())
    assert resumed["records"] == first["records"]
    assert resumed["qrels_agreement"] == first["qrels_agreement"]


def test_a_finished_run_asks_the_teacher_nothing_more(dl20_simulator, dl20_labels) -> None:
    asked = dl20_simulator.state.requests
    assert main(distill_args(dl20_simulator, dl20_labels, "--qrels", str(DL20 / "qrels.txt"))) == 0
    assert dl20_simulator.state.requests == asked
    stats = json.loads((dl20_labels / "stats.json").read_text())
    assert stats["records"]["listwise"] == 108


def test_the_core_install_pulls_no_torch() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]
    assert "torch==2.13.0" in project["optional-dependencies"]["train"]
    code = (
        "import sys, permrank, permrank.cli.main, permrank.distill.labels, permrank.cli.distill\n"
        "permrank.cli.main.build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch imported by the core'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
