"""The end-of-run summary speaks plainly: calls to the model, answers from the cache, tokens."""

from __future__ import annotations

from permrank.cli.rerank import summary_lines
from permrank.core.types import Usage


def test_the_summary_names_calls_cache_answers_and_tokens_in_words() -> None:
    totals = Usage(calls=387, cached_calls=0, prompt_tokens=834096, completion_tokens=30573)
    totals.rounds = 43 * 9
    totals.repairs["ok"] = 387
    text = "\n".join(summary_lines(totals, 43, 1.1))
    assert "43 queries in 1.1 s: 387 calls to the model, 0 answers from the cache" in text
    assert "per query: 9 rounds of windows, one after another" in text
    assert "tokens: 834096 in prompts, 30573 in answers (864669 in all)" in text
    assert "window answers: ok 387" in text
    assert "sequential rounds" not in text and "tokens/s" not in text and "None" not in text


def test_a_resumed_run_with_nothing_left_says_so() -> None:
    assert summary_lines(Usage(), 0, 0.0) == [
        "0 queries left to rerank (0.0 s): nothing asked of the model"
    ]


def test_one_answer_from_the_cache_is_singular() -> None:
    totals = Usage(calls=0, cached_calls=1)
    assert "0 calls to the model, 1 answer from the cache" in summary_lines(totals, 1, 0.1)[0]


def test_the_demo_on_an_endpoint_shows_progress_and_a_plain_summary(
    simulator, dl19_5q, capsys
) -> None:
    from permrank.cli.main import main

    argv = ["demo", "--data", str(dl19_5q), "--queries", "2", "--depth", "10"]
    assert main([*argv, "--base-url", simulator.base_url, "--model", simulator.state.model]) == 0
    captured = capsys.readouterr()
    assert "2 queries in" in captured.out and "calls to the model" in captured.out
    assert "None" not in captured.out and "tokens/s" not in captured.out
    assert "demo: 100%" in captured.err and "2/2" in captured.err  # the progress bar
