"""One word per idea on the command line: old flags stay as aliases of the new ones."""

from __future__ import annotations

import pytest

from permrank.cli.main import build_parser
from permrank.cli.rerank import method_options_of
from permrank.core.errors import ConfigError
from permrank.engine.methods import Pairwise

PLACES = "top_n" if "top_n" in Pairwise.__dataclass_fields__ else "k"


def parsed(*flags: str):
    return build_parser().parse_args(["rerank", "--input", "i", "--output", "o", *flags])


def test_top_n_sets_the_places_pairwise_sorts_at_the_top() -> None:
    args = parsed("--method", "pairwise", "--pairwise", "heap", "--top-n", "5")
    assert method_options_of(args) == {"aggregation": "heap", PLACES: 5}


def test_pairwise_k_is_still_taken_and_agrees_with_top_n() -> None:
    assert method_options_of(parsed("--method", "pairwise", "--pairwise-k", "7")) == {PLACES: 7}
    args = parsed("--method", "pairwise", "--pairwise-k", "7", "--top-n", "7")
    assert method_options_of(args) == {PLACES: 7}
    with pytest.raises(ConfigError, match="--top-n 5 and --pairwise-k 7"):
        method_options_of(parsed("--method", "pairwise", "--pairwise-k", "7", "--top-n", "5"))


def test_top_n_stays_the_strategy_s_for_listwise() -> None:
    args = parsed("--strategy", "tdpart", "--top-n", "5")
    assert args.top_n == 5 and method_options_of(args) == {}


def test_distill_names_augmentation_augment_and_still_takes_shuffles(tmp_path) -> None:
    import json

    from permrank.distill.labels import CONFIG, LabelOptions, LabelStore

    old = LabelOptions(shuffles=2)
    assert old.augment == 2 and old.shuffles == 2 and old == LabelOptions(augment=2)
    described = LabelOptions(augment=2).describe()
    assert described["augment"] == 2 and "shuffles" not in described
    assert (
        build_parser()
        .parse_args(["distill", "--input", "i", "--out", "o", "--input-shuffles", "3"])
        .augment
        == 3
    )

    # a folder written before the rename (config.json says "shuffles") resumes
    LabelStore.open(tmp_path, LabelOptions(augment=1)).close()
    config = json.loads((tmp_path / CONFIG).read_text())
    config["shuffles"] = config.pop("augment")
    (tmp_path / CONFIG).write_text(json.dumps(config))
    LabelStore.open(tmp_path, LabelOptions(augment=1)).close()
    with pytest.raises(ConfigError, match="augment"):
        LabelStore.open(tmp_path, LabelOptions(augment=2))


def test_a_run_record_written_with_labels_shuffles_is_read_as_labels_augment(tmp_path) -> None:
    import json

    from permrank.runs.store import RunStore

    out = tmp_path / "labels"
    out.mkdir()
    (out / "done.jsonl").write_text("{}\n")
    record = out / "run.json"
    record.write_text(json.dumps({"fingerprint": {"labels.shuffles": 1, "model": "m"}}))
    store = RunStore(out, record, overwrite=False, flag="--out", has_results=True)
    store.check({"labels": {"augment": 1}, "model": "m"})
    with pytest.raises(ConfigError, match="labels.augment"):
        store.check({"labels": {"augment": 2}, "model": "m"})


def test_serve_local_takes_the_names_rerank_gives_its_embedded_server() -> None:
    args = build_parser().parse_args(
        ["serve", "local", "--local-ctx", "1024", "--local-parallel", "2"]
    )
    assert (args.ctx, args.parallel) == (1024, 2)
    args = build_parser().parse_args(["serve", "local", "--ctx", "2048", "--parallel", "3"])
    assert (args.ctx, args.parallel) == (2048, 3)
