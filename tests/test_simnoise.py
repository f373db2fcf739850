"""The simulator's noise models, its noise spec, and its Responses API route."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from permrank.core.errors import ConfigError
from permrank.sim.noise import Noise, judge_order, parse_noise

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
GRADES = [0, 3, 0, 2, 1, 0, 0, 3, 0, 1, 0, 2, 0, 0, 1, 0, 0, 0, 2, 0]


def by_grade(grades: list[int]) -> list[int]:
    return sorted(range(len(grades)), key=lambda i: -grades[i])


def test_no_noise_is_the_order_by_grade_with_ties_in_shown_order():
    assert judge_order(GRADES, Noise(), "k") == by_grade(GRADES)
    assert judge_order([1, 1, 1], Noise(), "k") == [0, 1, 2]


def test_swaps_are_seeded_and_keep_a_permutation():
    noise = Noise(swap=0.3, seed=4)
    a = judge_order(GRADES, noise, "key")
    assert a == judge_order(GRADES, noise, "key")
    assert sorted(a) == list(range(len(GRADES)))
    assert a != by_grade(GRADES)
    others = {tuple(judge_order(GRADES, Noise(swap=0.3, seed=s), "key")) for s in range(10)}
    assert len(others) > 1


def test_position_bias_lifts_the_ends_of_a_window():
    flat = [1] * 10
    order = judge_order(flat, Noise(bias=0.5), "k")
    assert set(order[:2]) == {0, 9}  # the first and the last shown win among equals
    # A bias of 1.5 grades beats one grade of relevance at the ends, not in the middle.
    grades = [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    biased = judge_order(grades, Noise(bias=1.5), "k")
    assert biased[:2] == [0, 9]
    assert judge_order(grades, Noise(), "k")[:2] == [4, 5]


def test_missed_passages_are_left_out_of_the_answer():
    lengths = [len(judge_order(GRADES, Noise(miss=0.2, seed=s), str(s))) for s in range(200)]
    assert all(n <= len(GRADES) for n in lengths)
    assert 0.7 * 20 < statistics.mean(lengths) < 0.9 * 20
    kept = judge_order(GRADES, Noise(miss=0.2, seed=1), "x")
    assert kept == [i for i in by_grade(GRADES) if i in set(kept)]  # order of the rest is true


def test_limited_attention_blurs_only_passages_after_the_first_n():
    grades = [0] * 5 + [3] + [0] * 14
    errs_early = errs_late = 0
    for s in range(100):
        early = judge_order(grades, Noise(attention=10, seed=s), "k")
        errs_early += early[0] != 5
        late = judge_order([0] * 15 + [3] + [0] * 4, Noise(attention=10, seed=s), "k")
        errs_late += late[0] != 15
    assert errs_early == 0
    assert errs_late > 10


def test_noise_spec_strings():
    assert parse_noise("0.1", seed=3) == Noise(swap=0.1, seed=3)
    assert parse_noise(None) == Noise()
    spec = parse_noise("swap:0.1, bias:0.5,miss:0.02,attention:10,seed:7")
    assert spec == Noise(swap=0.1, bias=0.5, miss=0.02, attention=10, seed=7)
    with pytest.raises(ConfigError, match="KEY:VALUE"):
        parse_noise("wobble:1")
    with pytest.raises(ConfigError, match="probability"):
        parse_noise("swap:2")
    with pytest.raises(ConfigError, match="needs a number"):
        parse_noise("bias:lots")


def test_simulate_command_takes_a_spec_or_a_number():
    from permrank.cli.main import build_parser

    parser = build_parser()
    for spec in ("0.1", "swap:0.1,bias:0.3"):
        args = parser.parse_args(["simulate", "--data", "x", "--noise", spec])
        assert parse_noise(args.noise, seed=args.seed).swap == 0.1


def test_responses_route_answers_an_openai_responses_client():
    import openai

    from permrank.core.prompts import load_template, render_window
    from permrank.runs.io import read_requests
    from permrank.sim.server import Corpus, Simulator

    corpus = Corpus.from_files(
        FIXTURES / "dl19-5q/candidates.jsonl", FIXTURES / "dl19-5q/qrels.txt"
    )
    request = next(read_requests(FIXTURES / "dl19-5q/candidates.jsonl"))
    passages = [(c.text, c.title) for c in request.candidates[:10]]
    messages = render_window(load_template("rankgpt"), request.query.text, passages)
    with Simulator(corpus) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="none", max_retries=0)
        response = client.responses.create(model="sim", input=messages)  # type: ignore[arg-type]
        chat = client.chat.completions.create(model="sim", messages=messages)  # type: ignore[arg-type]
        client.close()
    assert response.output[-1].content[0].text == chat.choices[0].message.content
    assert response.output_text.startswith("[")
    assert response.usage is not None and response.usage.input_tokens > 100
    assert sim.state.unmatched == 0
