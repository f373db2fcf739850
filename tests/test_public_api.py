"""The public API a newcomer guesses: ``from permrank import Reranker, rank``, option groups,
old module paths, scores that mean the same in Python and in JSONL, SelfConsistency around a
strategy value, one registry, pairwise ``top_n``."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import permrank
from permrank import (
    Budget,
    Candidate,
    ConfigError,
    Limits,
    Ranking,
    Request,
    Reranker,
    Sampling,
    SelfConsistency,
    SlidingWindow,
    TopDownPartition,
    Tournament,
    get_method,
    get_strategy,
    rank,
    run_plan,
)
from permrank.runs.io import ranking_record, read_requests
from permrank.sim.server import Simulator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def requests(dl19_5q: Path) -> list[Request]:
    return list(read_requests(dl19_5q / "candidates.jsonl"))


def run_python(code: str) -> str:
    env_path = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    return out.stdout.strip()


# -- the namespace ----------------------------------------------------------------------------
def test_import_permrank_is_lazy() -> None:
    """Importing permrank loads none of the engine, backends or pydantic until a name is used."""
    loaded = run_python(
        "import sys, permrank; print(sorted(m for m in sys.modules "
        "if m.startswith(('permrank.', 'pydantic', 'openai', 'aiohttp', 'httpx'))))"
    )
    assert loaded == "['permrank._aliases']"
    loaded = run_python(
        "import sys; from permrank import parse_permutation; "
        "print(parse_permutation('[2] > [1]', 2)[0], "
        "any(m.startswith(('permrank.engine', 'permrank.backends')) for m in sys.modules))"
    )
    assert loaded == "[1, 0] False"


def test_every_public_name_resolves_and_dir_lists_it() -> None:
    for name in permrank.__all__:
        assert getattr(permrank, name) is not None, name
    assert set(permrank.__all__) <= set(dir(permrank))
    assert {"Reranker", "rank", "SelfConsistency", "run_plan", "get_method"} <= set(dir(permrank))
    from permrank.core.version import version

    assert permrank.__version__ == version()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        permrank.nope  # noqa: B018


def test_old_module_paths_give_the_same_objects() -> None:
    import permrank.engine.reranker as reranker_module
    from permrank.cli import rerank as new_cli_rerank
    from permrank.core.logprobs import floor_logprob as new_floor
    from permrank.core.strategies import sliding
    from permrank.distill.labels import LabelOptions
    from permrank.distill.train import losses
    from permrank.engine import methods
    from permrank.engine.pipeline import Pipeline, ask_window, drive_strategy
    from permrank.runs import evaluate, io, store

    def old(name: str) -> Any:  # imported by their old dotted names, as earlier code does
        return importlib.import_module(name)

    old_rerank = old("permrank.rerank")
    assert old_rerank is reranker_module and old_rerank.__name__ == "permrank.engine.reranker"
    assert old_rerank.__spec__.name == "permrank.engine.reranker"
    assert (
        old_rerank.Reranker,
        old_rerank.Pipeline,
        old_rerank.ask_window,
        old_rerank.drive_strategy,
    ) == (Reranker, Pipeline, ask_window, drive_strategy)
    assert old("permrank.strategies").run_plan is run_plan
    assert old("permrank.strategies.sliding").SlidingWindow is sliding.SlidingWindow
    assert sliding.SlidingWindow is SlidingWindow
    assert old("permrank.commands.rerank") is new_cli_rerank
    assert old("permrank.losses") is losses and old("permrank.io") is io
    assert old("permrank.evaluate") is evaluate
    assert old("permrank.types").Ranking is Ranking
    assert old("permrank.errors").ConfigError is ConfigError
    assert old("permrank.methods") is methods and old("permrank.runstore") is store
    assert old("permrank.methods.logprobs").floor_logprob is new_floor
    assert old("permrank.distill").LabelOptions is LabelOptions


def test_the_alias_finder_leaves_the_simulator_alone() -> None:
    out = run_python(
        "import sys, permrank, permrank.rerank, permrank.strategies, permrank.io; "
        "print(any(m.startswith('permrank.sim') for m in sys.modules)); "
        "import permrank.simulator as s, permrank.sim.server as t; print(s is t)"
    )
    assert out == "False\nTrue"


# -- option groups ----------------------------------------------------------------------------
def test_groups_and_flat_keywords_build_the_same_reranker() -> None:
    grouped = Reranker(
        "m",
        "http://127.0.0.1:9/v1",
        strategy=TopDownPartition(top_n=10),
        sampling=Sampling(temperature=0.5, seed=7, max_tokens=90, extra={"x": 1}),
        limits=Limits(concurrency=3, rps=2.0, timeout_s=30, max_retries=1),
        budget=Budget(max_passage_tokens=100, context_window=4096),
    )
    flat = Reranker(
        "m",
        "http://127.0.0.1:9/v1",
        strategy="tdpart",
        top_n=10,
        temperature=0.5,
        seed=7,
        max_tokens=90,
        extra_body={"x": 1},
        concurrency=3,
        rps=2.0,
        timeout_s=30,
        max_retries=1,
        max_passage_tokens=100,
        context_window=4096,
    )
    assert grouped.manifest() == flat.manifest()
    manifest = grouped.manifest()
    assert manifest["sampling"] == {
        "temperature": 0.5,
        "seed": 7,
        "max_tokens": 90,
        "extra": {"x": 1},
    }
    assert manifest["budget"]["context_window"] == 4096
    assert set(manifest) == {
        "strategy", "template", "backend", "sampling", "budget",
        "tokenizer", "constrain", "on_error", "method",
    }  # fmt: skip
    assert grouped.concurrency == 3
    # a flat keyword equal to its group's value is no clash
    Reranker("m", "http://127.0.0.1:9/v1", temperature=0.5, sampling=Sampling(temperature=0.5))


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"temperature": 0.7, "sampling": Sampling(temperature=0.2)}, "temperature=0.7"),
        ({"concurrency": 4, "limits": Limits(concurrency=16)}, "limits.concurrency=16"),
        ({"context_window": 2048, "budget": Budget(context_window=4096)}, "context_window"),
        ({"sampling": {"temperature": 0}}, "must be a Sampling"),
    ],
)
def test_a_flat_keyword_against_its_group_is_refused(options: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Reranker("m", "http://127.0.0.1:9/v1", **options)


def test_method_is_a_name_or_a_value() -> None:
    by_name = Reranker("m", "http://127.0.0.1:9/v1", method="pairwise", method_options={"k": 5})
    by_value = Reranker("m", "http://127.0.0.1:9/v1", method=get_method("pairwise", top_n=5))
    assert by_name.manifest()["method"] == by_value.manifest()["method"]
    assert by_value.manifest()["method"]["top_n"] == 5 and "k" not in by_value.manifest()["method"]


# -- one call, many shapes --------------------------------------------------------------------
def test_rank_is_one_call(simulator: Simulator, requests: list[Request]) -> None:
    request = requests[0]
    documents = [c.text for c in request.candidates]
    ranking = rank(
        request.query.text,
        documents,
        model="sim",
        base_url=simulator.base_url,
        strategy=TopDownPartition(top_n=10),
    )
    with Reranker("sim", simulator.base_url, strategy="tdpart", top_n=10) as reranker:
        again = reranker.rank(request.query.text, documents)
    assert ranking.docids == again.docids and len(ranking.docids) == len(documents)


def test_rerank_batch_takes_what_rank_takes(simulator: Simulator, requests: list[Request]) -> None:
    a, b = requests[0], requests[1]
    as_dicts = [{"docid": c.docid, "text": c.text} for c in b.candidates]
    with Reranker("sim", simulator.base_url) as reranker:
        expected = reranker.rerank_batch([a, b])
        mixed = reranker.rerank_batch(
            [
                (a.query.text, list(a.candidates)),  # Candidates
                {"query": b.query.text, "documents": as_dicts, "qid": b.query.qid},
            ]
        )
        strings = reranker.rerank_batch([(a.query.text, [c.text for c in a.candidates])])
        with pytest.raises(ConfigError, match="request 1: a dict needs 'query'"):
            reranker.rerank_batch([a, {"q": "x"}])
    assert [r.docids for r in mixed] == [r.docids for r in expected]
    assert mixed[0].query.qid == "0" and mixed[1].query.qid == b.query.qid
    texts = {c.docid: c.text for c in a.candidates}
    assert [c.text for c in strings[0].candidates] == [texts[d] for d in expected[0].docids]


# -- scores -----------------------------------------------------------------------------------
def test_ranking_scores_are_the_jsonl_scores(simulator: Simulator, requests: list[Request]) -> None:
    request = requests[0].model_copy(
        update={
            "candidates": [
                c.model_copy(update={"score": 100.0 - i})
                for i, c in enumerate(requests[0].candidates)
            ]
        }
    )
    with Reranker("sim", simulator.base_url) as reranker:
        (ranking,) = reranker.rerank_batch([request])
    record = json.loads(json.dumps(ranking_record(ranking)))
    assert [c["score"] for c in record["candidates"]] == [c.score for c in ranking.candidates]
    assert [c.score for c in ranking.candidates] == [
        float(len(ranking.candidates) - i) for i in range(len(ranking.candidates))
    ]
    first_stage = {c.docid: c.score for c in request.candidates}
    assert all(c.first_stage_score == first_stage[c.docid] for c in ranking.candidates)
    assert "first_stage_score" not in record["candidates"][0]  # the output is as it was
    # scores sit with their candidates even when a Ranking is rebuilt in another order
    rebuilt = Ranking(query=ranking.query, candidates=list(reversed(ranking.candidates)))
    assert rebuilt.candidates[0].score == len(rebuilt.candidates)
    assert rebuilt.candidates[0].first_stage_score == ranking.candidates[-1].first_stage_score


def test_a_candidate_without_a_first_stage_score() -> None:
    ranking = Ranking(
        query={"qid": "1", "text": "q"},
        candidates=[Candidate(docid="a", text="x"), Candidate(docid="b", text="y")],
    )
    assert [(c.score, c.first_stage_score) for c in ranking.candidates] == [
        (2.0, None),
        (1.0, None),
    ]


# -- SelfConsistency and the registry ---------------------------------------------------------
def judge(window: list[int]) -> list[int]:
    return sorted(window)


def test_selfconsistency_wraps_a_strategy_value() -> None:
    value = SelfConsistency(TopDownPartition(top_n=10), shuffles=3, aggregate="kemeny")
    named = get_strategy(
        "selfconsistency", inner="tdpart", top_n=10, shuffles=3, aggregate="kemeny"
    )
    assert value == named
    assert value.inner == TopDownPartition(top_n=10) and value.top_n == 10
    assert run_plan(value.plan(50), judge) == run_plan(named.plan(50), judge)
    assert run_plan(value.plan(50), judge)[0][:10] == list(range(10))
    described = value.describe()
    json.dumps(described)  # a manifest's plain values
    assert described["inner"] == "tdpart" and described["inner_options"]["top_n"] == 10
    assert SelfConsistency(Tournament(top_n=5)).inner_strategy() == Tournament(top_n=5)


def test_selfconsistency_refuses_fields_beside_a_value() -> None:
    with pytest.raises(ConfigError, match="takes top_n from the strategy it wraps"):
        SelfConsistency(TopDownPartition(), top_n=5)
    with pytest.raises(ConfigError, match="cannot wrap itself"):
        SelfConsistency(SelfConsistency(SlidingWindow()))
    with pytest.raises(ConfigError, match="cannot wrap itself"):
        get_strategy("selfconsistency", inner="selfconsistency")
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        SelfConsistency("nope")


def test_reranker_manifest_of_a_wrapped_strategy(simulator: Simulator) -> None:
    reranker = Reranker(
        "sim", simulator.base_url, strategy=SelfConsistency(SlidingWindow(window_size=10))
    )
    strategy = reranker.manifest()["strategy"]
    json.dumps(strategy)
    assert strategy["inner"] == "sliding" and strategy["window_size"] == 10


def test_one_registry_checks_strategies_and_methods_alike() -> None:
    from permrank.core.registry import build

    with pytest.raises(ConfigError, match="unknown strategy 'x'; choose one of"):
        get_strategy("x")
    with pytest.raises(ConfigError, match="strategy 'sliding' does not take top_n"):
        get_strategy("sliding", top_n=3)
    assert get_strategy("sliding", top_n=None) == SlidingWindow()
    with pytest.raises(ConfigError, match="unknown method 'x'; choose one of: listwise"):
        get_method("x")
    with pytest.raises(ConfigError, match="method 'pointwise' does not take shuffles"):
        get_method("pointwise", shuffles=3)
    assert get_method("listwise", top_k=5) is None  # a shared option
    assert build("strategy", {"tdpart": TopDownPartition}, "tdpart", {"top_n": 4}).top_n == 4


def test_pairwise_top_n_and_its_k_alias() -> None:
    assert get_method("pairwise", k=4) == get_method("pairwise", top_n=4)
    assert get_method("pairwise", k=4).top_n == 4  # type: ignore[union-attr]
    assert get_method("pairwise", top_n=4, k=4).top_n == 4  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="disagree"):
        get_method("pairwise", top_n=4, k=6)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        get_method("pairwise", k=0)
    with pytest.raises(ConfigError, match="top_n .* must be at least 1"):
        get_method("pairwise", top_n=0)


def test_top_n_reaches_pairwise_through_the_reranker() -> None:
    url = "http://127.0.0.1:9/v1"
    reranker = Reranker("m", url, method="pairwise", top_n=4)
    assert reranker.manifest()["method"]["top_n"] == 4
    assert reranker.manifest()["strategy"]["name"] == "sliding"  # which takes no top_n
    both = Reranker("m", url, method="pairwise", strategy="tdpart", top_n=4)
    assert both.strategy == TopDownPartition(top_n=4) and both.method.top_n == 4  # type: ignore[union-attr]
    same = Reranker("m", url, method="pairwise", top_n=4, method_options={"k": 4})
    assert same.method == reranker.method
    # as before: the strategy's top_n and pairwise's own k side by side
    apart = Reranker(
        "m", url, strategy="tdpart", top_n=10, method="pairwise", method_options={"k": 6}
    )
    assert apart.strategy.top_n == 10 and apart.method.top_n == 6  # type: ignore[attr-defined,union-attr]
    with pytest.raises(ConfigError, match="strategy 'sliding' does not take top_n"):
        Reranker("m", url, top_n=4)  # listwise: top_n is the strategy's, which has none
