"""Scoring choices measured for small local models: fusion with the first stage, graded labels."""

from __future__ import annotations

import pytest

from permrank.core.errors import ConfigError
from permrank.core.types import Candidate
from permrank.engine.methods import get_method
from permrank.engine.methods.likelihood import CHAT_UPR_PROMPT, fuse
from permrank.engine.methods.pointwise import GRADED_PROMPT, graded_score, yes_no_score


def cands(scores: list[float | None]) -> list[Candidate]:
    return [Candidate(docid=str(i), text="", score=s) for i, s in enumerate(scores)]


def test_fuse_mixes_min_max_normalised_scores() -> None:
    model = [-2.0, -1.0, -3.0]
    first = cands([10.0, 5.0, 0.0])
    assert fuse(model, first, None) == model
    assert fuse(model, first, 1.0) == pytest.approx([0.5, 1.0, 0.0])
    assert fuse(model, first, 0.0) == pytest.approx([1.0, 0.5, 0.0])
    assert fuse(model, first, 0.5) == pytest.approx([0.75, 0.75, 0.0])


def test_fuse_uses_ranks_without_first_stage_scores() -> None:
    # No scores: the input order counts, first best.
    assert fuse([0.0, 0.0, 1.0], cands([None, None, None]), 0.5) == pytest.approx([0.5, 0.25, 0.5])
    # A scale change of the model's score (sum vs mean over the same query) changes nothing.
    a = fuse([-1.0, -2.0, -4.0], cands([3.0, 2.0, 1.0]), 0.3)
    b = fuse([-5.0, -10.0, -20.0], cands([3.0, 2.0, 1.0]), 0.3)
    assert a == pytest.approx(b)


def test_method_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="interpolate must be between 0 and 1"):
        get_method("likelihood", interpolate=1.5)
    with pytest.raises(ConfigError, match="labels must be one of yesno, graded"):
        get_method("pointwise", labels="stars")
    method = get_method("likelihood", prompt="chat-upr", interpolate=0.4)
    assert method.prompt == CHAT_UPR_PROMPT and method.describe()["interpolate"] == 0.4
    assert get_method("pointwise", labels="graded").prompt == GRADED_PROMPT


def test_graded_score_is_the_expected_grade() -> None:
    # The first answer token's alternatives as llama.cpp lists them.
    top = [("Highly", -0.1), ("Somewhat", -2.5), ("Not", -4.0), ("The", -5.0)]
    score = graded_score(top)
    assert 1.8 < score < 2.0
    assert graded_score([("Not", -0.05), ("Somewhat", -3.0), ("The", -6.0)]) < 0.1
    # Case and spacing variants are one word.
    assert graded_score([(" highly", -0.1), ("HIGHLY", -0.2), ("Not", -6.0)]) > 1.99


def test_yes_no_reading_of_a_real_llamacpp_answer() -> None:
    """Qwen2.5-Coder-0.5B's first-token alternatives for a relevant DL19 passage (measured):
    P(yes)/(P(yes)+P(no)) from the merged variants, as the softmax normalisation says."""
    top = [("No", -0.166), ("Yes", -1.91), ("To", -6.9), ("NO", -8.35), (" No", -8.74)]
    import math

    yes, no = math.exp(-1.91), math.exp(-0.166) + math.exp(-8.35) + math.exp(-8.74)
    assert yes_no_score(top, "softmax") == pytest.approx(yes / (yes + no))
    assert yes_no_score(top, "logprob") == pytest.approx(-1.91)
