"""Scoring methods, the pure parts: logprobs shapes, yes/no scores, pairwise plans."""

from __future__ import annotations

import math
import random

import pytest

from permrank.core.errors import ConfigError
from permrank.core.logprobs import (
    TokenLogprob,
    answer_position,
    generated_tokens,
    prompt_logprobs_tokens,
)
from permrank.engine.methods import get_method
from permrank.engine.methods.first import order_by_logprobs
from permrank.engine.methods.likelihood import echoed, tail_logprobs
from permrank.engine.methods.pairwise import (
    allpairs_plan,
    first_shown_probability,
    heap_plan,
    run_pair_plan,
    sliding_plan,
)
from permrank.engine.methods.pointwise import yes_no_score

YES_LOGPROBS = {
    "content": [
        {
            "token": "Yes",
            "logprob": -0.1,
            "top_logprobs": [
                {"token": "Yes", "logprob": -0.1},
                {"token": "No", "logprob": -2.4},
            ],
        }
    ]
}
"""A chat answer's logprobs for "Yes" (with "No" as the alternative), as OpenAI and llama.cpp
write them."""


def test_chat_and_legacy_logprobs_read_the_same():
    chat = {"logprobs": YES_LOGPROBS}
    legacy = {
        "logprobs": {
            "tokens": ["Yes"],
            "token_logprobs": [-0.1],
            "top_logprobs": [{"Yes": -0.1, "No": -2.4}],
            "text_offset": [7],
        }
    }
    a, b = generated_tokens(chat)[0], generated_tokens(legacy)[0]
    assert (a.token, a.logprob, a.top) == (b.token, b.logprob, b.top)
    assert b.offset == 7
    assert generated_tokens({"text": "Yes", "logprobs": None}) == []


def test_vllm_prompt_logprobs_are_read_in_prompt_order():
    choice = {
        "prompt_logprobs": [
            None,
            {"42": {"logprob": -1.5, "rank": 3, "decoded_token": " what"}},
            {"7": {"logprob": -0.5, "rank": 1, "decoded_token": " is"}},
        ]
    }
    tokens = prompt_logprobs_tokens(choice)
    assert [t.token for t in tokens] == ["", " what", " is"]
    assert [t.logprob for t in tokens] == [None, -1.5, -0.5]
    assert tokens[1].token_id == 42


def test_yes_variants_are_merged():
    top = [("Yes", math.log(0.3)), (" yes", math.log(0.2)), ("No", math.log(0.4)), ("NO", -5.0)]
    softmax = yes_no_score(top, "softmax")
    assert softmax == pytest.approx(0.5 / (0.5 + 0.4 + math.exp(-5.0)))
    assert yes_no_score(top, "vocab") == pytest.approx(0.5)
    assert yes_no_score(top, "logprob") == pytest.approx(math.log(0.3))


def test_an_unlisted_word_gets_the_smallest_listed_logprob():
    top = [("The", -0.2), ("No", -1.0), ("I", -3.0)]
    assert yes_no_score(top, "logprob") == -3.0
    assert yes_no_score(top, "softmax") == pytest.approx(1 / (1 + math.exp(-1.0 + 3.0)))


def test_answer_position_finds_the_letter_after_a_prefix():
    tokens = [
        TokenLogprob("Passage", -0.01, [("Passage", -0.01), ("A", -6.0)]),
        TokenLogprob(" B", -0.2, [(" B", -0.2), (" A", -1.7)]),
    ]
    position = answer_position(tokens, lambda w: w in ("a", "b"))
    assert position is tokens[1]
    assert first_shown_probability(position.top) == pytest.approx(1 / (1 + math.exp(-0.2 + 1.7)))
    opening = [TokenLogprob("[", -0.1, [("[", -0.1), ("C", -3.0)])]
    assert answer_position(opening, lambda w: w == "c") is opening[0]
    assert answer_position([TokenLogprob("Sure", -0.1, [])], lambda w: w == "a") is None


def test_first_orders_listed_identifiers_then_unlisted_in_shown_order():
    top = [(" C", -0.1), ("A", -1.0), ("[B", -1.0), ("Hello", -2.0)]
    order, missing = order_by_logprobs(top, ["A", "B", "C", "D", "E"])
    assert order == [2, 0, 1, 3, 4]
    assert missing == 2


def test_query_tokens_are_read_from_the_tail_of_an_echo():
    prompt = "Passage: fleas.\nQuestion: how long"
    tokens = [TokenLogprob(w, lp) for w, lp in [("Passage", None), (":", -1.0)]]
    tokens += [TokenLogprob(w, -2.0) for w in [" fleas", ".\n", "Question", ":"]]
    tokens += [TokenLogprob(" how", -0.5), TokenLogprob(" long", -1.5)]
    assert echoed(tokens, prompt)
    assert tail_logprobs(tokens, len(" how long")) == [-0.5, -1.5]
    assert not echoed([TokenLogprob("?", -0.5)], prompt)


def hidden_order(m: int, seed: int) -> list[int]:
    rank = list(range(m))
    random.Random(seed).shuffle(rank)
    return rank


@pytest.mark.parametrize("seed", range(5))
def test_pair_plans_find_the_hidden_order(seed):
    m, k = 30, 7
    rank = hidden_order(m, seed)  # rank[i]: place of candidate i in the hidden order

    def prefer(i, j):
        return 1.0 if rank[i] < rank[j] else 0.0

    best = sorted(range(m), key=lambda i: rank[i])
    order, asked = run_pair_plan(allpairs_plan(m), prefer)
    assert order == best and asked == m * (m - 1) // 2
    order, asked = run_pair_plan(sliding_plan(m, k), prefer)
    assert order[:k] == best[:k] and sorted(order) == list(range(m))
    order, asked = run_pair_plan(heap_plan(m, k), prefer)
    assert order[:k] == best[:k] and sorted(order) == list(range(m))
    # O(m log k): every new candidate costs at most 1 + 2 log2 k comparisons, plus the sort.
    assert asked <= m * (1 + 2 * math.ceil(math.log2(k))) + k * 2 * math.ceil(math.log2(k))
    assert asked < m * (m - 1) // 2


def test_pair_plans_keep_input_order_on_ties():
    def undecided(i, j):
        return 0.5

    for plan in (allpairs_plan(8), sliding_plan(8, 3), heap_plan(8, 3)):
        order, _ = run_pair_plan(plan, undecided)
        assert order == list(range(8))


def test_allpairs_sums_preference_probabilities():
    # 0 narrowly beats 1 and 2; 2 beats 1 clearly: sums 1.1, 0.5, 1.4
    prefs = {(0, 1): 0.55, (0, 2): 0.55, (1, 2): 0.05}
    order, _ = run_pair_plan(allpairs_plan(3), lambda i, j: prefs[(i, j)])
    assert order == [2, 0, 1]


def test_methods_are_named_values_with_checked_options():
    assert get_method("listwise") is None
    assert get_method("pairwise", aggregation="allpairs", k=None).aggregation == "allpairs"
    assert get_method("first", top_k=5).name == "first"  # shared option, not taken: ignored
    with pytest.raises(ConfigError, match="unknown method 'bm25'"):
        get_method("bm25")
    with pytest.raises(ConfigError, match="does not take mode"):
        get_method("pointwise", mode="echo")
    with pytest.raises(ConfigError, match="normalisation must be one of"):
        get_method("pointwise", normalisation="sigmoid")
    with pytest.raises(ConfigError, match="k must be at least 1"):
        get_method("pairwise", k=0)
