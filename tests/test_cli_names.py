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
