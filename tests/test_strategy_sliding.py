"""The sliding window strategy, driven by plain Python functions as the LLM."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest

from permrank.core.errors import ConfigError
from permrank.core.strategies import SlidingWindow, get_strategy, run_plan, window_bounds

SHAPES = [
    (n, window_size, step)
    for n in (1, 2, 3, 5, 7, 10, 19, 20, 21, 25, 29, 30, 31, 47, 100, 101)
    for window_size, step in ((2, 1), (2, 2), (3, 1), (3, 2), (4, 3), (5, 5), (20, 10), (20, 5))
]


def asked_windows(strategy: SlidingWindow, n: int) -> tuple[list[list[int]], list[int]]:
    """Every window the plan asks (as shown), with an identity judge; and the final order."""
    asked: list[list[int]] = []

    def identity(window: list[int]) -> list[int]:
        asked.append(list(window))
        return window

    order, _ = run_plan(strategy.plan(n), identity)
    return asked, order


def by_score(scores: list[float]):
    """A perfect judge: the window's candidates by descending score (ties: shown order)."""
    return lambda window: sorted(window, key=lambda i: -scores[i])


@pytest.mark.parametrize(("n", "window_size", "step"), SHAPES)
def test_window_bounds_cover_the_list_back_to_front(n: int, window_size: int, step: int) -> None:
    bounds = window_bounds(n, window_size, step)
    # The first window ends at the last candidate, the last one starts at rank 1.
    assert bounds[0][1] == n
    assert bounds[-1][0] == 0
    # Every full window has window_size candidates; a short list is one window.
    for start, end in bounds:
        assert end - start == min(window_size, end)
    # Windows move by exactly `step` (only the last is clamped at rank 1).
    ends = [end for _, end in bounds]
    assert ends == [n - k * step for k in range(len(bounds))]
    assert len(bounds) == 1 + math.ceil(max(0, n - window_size) / step)
    # Consecutive windows overlap or touch: no candidate is skipped.
    covered = set().union(*(range(s, e) for s, e in bounds))
    assert covered == set(range(n))


@pytest.mark.parametrize(
    ("n", "window_size", "step", "expected"),
    [
        (1, 20, 10, [(0, 1)]),
        (5, 20, 10, [(0, 5)]),
        (20, 20, 10, [(0, 20)]),
        (21, 20, 10, [(1, 21), (0, 11)]),
        (25, 20, 10, [(5, 25), (0, 15)]),
        (30, 20, 10, [(10, 30), (0, 20)]),
        # (n - window) = 15 is not a multiple of step: RankGPT's loop would stop at (5, 25)
        # and never rerank ranks 1..5; ours ends with a window at rank 1.
        (35, 20, 10, [(15, 35), (5, 25), (0, 15)]),
        (10, 4, 3, [(6, 10), (3, 7), (0, 4)]),
        (7, 3, 2, [(4, 7), (2, 5), (0, 3)]),
        (8, 3, 2, [(5, 8), (3, 6), (1, 4), (0, 2)]),
    ],
)
def test_window_bounds_hand_worked(n, window_size, step, expected) -> None:
    assert window_bounds(n, window_size, step) == expected


def test_hundred_candidates_twenty_ten_is_nine_windows_per_pass() -> None:
    for passes in (1, 2, 3):
        asked, _ = asked_windows(SlidingWindow(window_size=20, step=10, passes=passes), 100)
        assert len(asked) == 9 * passes
        starts = [w[0] for w in asked[:9]]
        assert starts == [80, 70, 60, 50, 40, 30, 20, 10, 0]
        assert all(len(w) == 20 for w in asked)


@pytest.mark.parametrize(("n", "window_size", "step"), SHAPES)
@pytest.mark.parametrize("passes", [1, 2])
def test_plan_asks_the_bounds_in_order(n: int, window_size: int, step: int, passes: int) -> None:
    asked, order = asked_windows(
        SlidingWindow(window_size=window_size, step=step, passes=passes), n
    )
    # With an identity judge the order never changes, so windows are plain ranges.
    expected = [
        list(range(s, e)) for s, e in window_bounds(n, window_size, step) if e - s >= 2
    ] * passes
    assert asked == expected
    assert order == list(range(n))


def test_one_candidate_asks_nothing() -> None:
    for strategy in (SlidingWindow(), SlidingWindow(window_size=2, step=1, passes=3)):
        order, rounds = run_plan(strategy.plan(1), lambda w: pytest.fail("asked a window"))
        assert (order, rounds) == ([0], 0)
    order, rounds = run_plan(SlidingWindow().plan(0), lambda w: pytest.fail("asked a window"))
    assert (order, rounds) == ([], 0)


@pytest.mark.parametrize("n", [2, 3, 10, 19, 20])
def test_short_list_is_one_window(n: int) -> None:
    asked, _ = asked_windows(SlidingWindow(window_size=20, step=10), n)
    assert asked == [list(range(n))]


def test_lone_passage_window_is_not_asked() -> None:
    # 5 candidates, windows of 2 moved by 2: (3,5), (1,3), then (0,1) holds one passage.
    asked, _ = asked_windows(SlidingWindow(window_size=2, step=2), 5)
    assert asked == [[3, 4], [1, 2]]


@pytest.mark.parametrize(
    ("n", "top_k", "window_size", "step", "expected_starts"),
    [
        (100, 30, 20, 10, [10, 0]),
        (100, 20, 20, 10, [0]),
        (10, 4, 3, 2, [1, 0]),
        (10, 50, 3, 2, [7, 5, 3, 1, 0]),
    ],
)
def test_top_k_reranks_only_the_head(n, top_k, window_size, step, expected_starts) -> None:
    strategy = SlidingWindow(window_size=window_size, step=step, top_k=top_k)
    asked, _ = asked_windows(strategy, n)
    assert [w[0] for w in asked] == expected_starts
    m = min(top_k, n)
    assert all(w[-1] < m for w in asked)
    scores = [random.Random(n * 31 + top_k + i).random() for i in range(n)]
    order, _ = run_plan(strategy.plan(n), by_score(scores))
    assert order[m:] == list(range(m, n))  # the tail is untouched
    keep = window_size - step
    assert order[:keep] == sorted(range(m), key=lambda i: -scores[i])[:keep]


def test_top_k_one_asks_nothing() -> None:
    order, rounds = run_plan(SlidingWindow(top_k=1).plan(10), lambda w: pytest.fail("asked"))
    assert order == list(range(10)) and rounds == 0


@pytest.mark.parametrize(("n", "window_size", "step"), [s for s in SHAPES if s[0] >= 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perfect_judge_puts_true_top_first(n: int, window_size: int, step: int, seed: int) -> None:
    rng = random.Random(seed * 1000 + n)
    scores = [rng.random() for _ in range(n)]
    order, rounds = run_plan(
        SlidingWindow(window_size=window_size, step=step).plan(n), by_score(scores)
    )
    assert sorted(order) == list(range(n))
    keep = min(n, window_size - step)  # with step == window_size nothing is promised
    truth = sorted(range(n), key=lambda i: -scores[i])
    assert order[:keep] == truth[:keep]
    assert rounds == len([b for b in window_bounds(n, window_size, step) if b[1] - b[0] >= 2])


@pytest.mark.parametrize(("n", "window_size", "step"), [(20, 3, 1), (30, 5, 2), (100, 20, 10)])
def test_enough_passes_sort_completely(n: int, window_size: int, step: int) -> None:
    rng = random.Random(n)
    scores = [rng.random() for _ in range(n)]
    truth = sorted(range(n), key=lambda i: -scores[i])
    keep = max(1, window_size - step)
    passes = math.ceil(n / keep)  # each pass fixes at least `keep` more of the head
    strategy = SlidingWindow(window_size=window_size, step=step, passes=passes)
    order, _ = run_plan(strategy.plan(n), by_score(scores))
    assert order == truth


def test_hand_worked_two_passes() -> None:
    # Candidates 0..4 with scores 1,5,2,4,3; windows of 3 moved by 2 ask (2,5) then (0,3).
    # Pass 1: [2,3,4] -> [3,4,2] gives [0,1,3,4,2]; [0,1,3] -> [1,3,0] gives [1,3,0,4,2].
    # Pass 2: [0,4,2] -> [4,2,0] gives [1,3,4,2,0]; [1,3,4] is already in order.
    scores = [1, 5, 2, 4, 3]
    one, _ = run_plan(SlidingWindow(window_size=3, step=2).plan(5), by_score(scores))
    assert one == [1, 3, 0, 4, 2]
    two, rounds = run_plan(SlidingWindow(window_size=3, step=2, passes=2).plan(5), by_score(scores))
    assert two == [1, 3, 4, 2, 0]
    assert rounds == 4


def test_hand_worked_reversing_judge() -> None:
    # A judge that reverses each window: n=6, w=4, s=2 asks (2,6) then (0,4).
    # [2,3,4,5] -> [5,4,3,2] gives [0,1,5,4,3,2]; [0,1,5,4] -> [4,5,1,0] gives [4,5,1,0,3,2].
    order, _ = run_plan(SlidingWindow(window_size=4, step=2).plan(6), lambda w: w[::-1])
    assert order == [4, 5, 1, 0, 3, 2]


def test_early_stop_ends_when_the_head_is_stable() -> None:
    scores = [1, 5, 2, 4, 3]
    strategy = SlidingWindow(window_size=3, step=2, passes=5, early_stop=True)
    order, rounds = run_plan(strategy.plan(5), by_score(scores))
    # Pass 1 changes the head (0 -> 1); pass 2 leaves it at 1 and stops: 2 passes of 2 windows.
    assert rounds == 4
    assert order == [1, 3, 4, 2, 0]
    without, rounds_without = run_plan(
        SlidingWindow(window_size=3, step=2, passes=5).plan(5), by_score(scores)
    )
    assert rounds_without == 10
    assert without[:1] == order[:1]


def test_early_stop_after_one_pass_when_already_sorted() -> None:
    strategy = SlidingWindow(window_size=20, step=10, passes=3, early_stop=True)
    order, rounds = run_plan(strategy.plan(100), lambda w: sorted(w))
    assert order == list(range(100))
    assert rounds == 9


def test_plan_refuses_an_answer_that_is_not_a_permutation() -> None:
    plan = SlidingWindow(window_size=3, step=2).plan(5)
    window = next(plan)[0]
    with pytest.raises(ValueError, match="not a permutation"):
        plan.send([window[:-1] + [window[0]]])


def test_plans_are_independent_values() -> None:
    strategy = SlidingWindow(window_size=3, step=1)
    first, _ = run_plan(strategy.plan(6), lambda w: w[::-1])
    second, _ = run_plan(strategy.plan(6), lambda w: w[::-1])
    assert first == second


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"step": 0}, "step must be at least 1 (got 0)"),
        ({"step": -3}, "step must be at least 1 (got -3)"),
        ({"window_size": 10, "step": 11}, "step (11) is larger than window_size (10)"),
        ({"window_size": 1, "step": 1}, "window_size must be at least 2 (got 1)"),
        ({"window_size": 0, "step": 1}, "window_size must be at least 2 (got 0)"),
        ({"top_k": 0}, "top_k must be at least 1 (got 0)"),
        ({"top_k": -5}, "top_k must be at least 1 (got -5)"),
        ({"passes": 0}, "passes must be at least 1 (got 0)"),
    ],
)
def test_impossible_settings_are_refused(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        SlidingWindow(**params)
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_strategy("sliding", **params)


def test_get_strategy_by_name() -> None:
    strategy = get_strategy("sliding", window_size=4, step=2, passes=None, top_k=None)
    assert strategy == SlidingWindow(window_size=4, step=2)
    with pytest.raises(ConfigError, match="unknown strategy 'bubble'; choose one of: .*sliding"):
        get_strategy("bubble")
    with pytest.raises(ConfigError, match="does not take depth"):
        get_strategy("sliding", depth=3)


def test_every_permutation_of_a_small_window_is_accepted() -> None:
    # Any answer the judge gives that reorders the window is applied exactly.
    for perm in itertools.permutations(range(4)):
        order, _ = run_plan(SlidingWindow(window_size=4, step=2).plan(4), lambda w, p=perm: list(p))
        assert order == list(perm)
