"""Strategies driven by pure function judges: guarantees, round counts, window sizes."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from permrank.core.errors import ConfigError
from permrank.core.strategies import STRATEGIES, get_strategy, run_plan
from permrank.core.strategies.common import cover_pairs
from permrank.core.strategies.selfconsistency import borda, kemeny
from permrank.core.strategies.tournament import copeland_order

Judge = Callable[[list[int]], Sequence[int]]


def perfect_judge(true_rank: Sequence[int]) -> Judge:
    """Orders a window by ``true_rank`` (0 = best)."""
    return lambda window: sorted(window, key=lambda c: true_rank[c])


def drive(strategy, n: int, judge: Judge) -> tuple[list[int], int, list[list[int]]]:
    """Run a plan; the final order, the rounds and every window asked."""
    asked: list[list[int]] = []

    def recording(window: list[int]) -> Sequence[int]:
        asked.append(list(window))
        return judge(window)

    order, rounds = run_plan(strategy.plan(n), recording)
    return order, rounds, asked


def random_ranks(n: int, seed: int) -> list[int]:
    rank = list(range(n))
    random.Random(seed).shuffle(rank)
    return rank


def noisy_first_stage(n: int, seed: int, spread: float = 15.0) -> list[int]:
    """True ranks that agree with the input order roughly, like BM25 against qrels."""
    rng = random.Random(seed)
    scores = [i + rng.gauss(0, spread) for i in range(n)]
    by_score = sorted(range(n), key=lambda i: scores[i])
    rank = [0] * n
    for r, i in enumerate(by_score):
        rank[i] = r
    return rank


GUARANTEED = ("tournament", "tdpart")
VARIANTS = [
    ("tournament", {}),
    ("tdpart", {}),
    ("tdpart", {"pair_finish": False}),
    ("tdpart", {"fill_final": False}),
    ("tdpart", {"guard": False}),
]
SIZES = [1, 2, 3, 7, 19, 20, 21, 40, 41, 57, 100, 133]
SHAPES = [(2, 1), (3, 1), (5, 2), (8, 3), (10, 5), (10, 7), (20, 10), (20, 5), (20, 15), (7, 6)]


@pytest.mark.parametrize("name,options", VARIANTS)
@pytest.mark.parametrize("window_size,top_n", SHAPES)
def test_perfect_judge_puts_true_top_n_first_in_order(name, options, window_size, top_n):
    strategy = get_strategy(name, window_size=window_size, top_n=top_n, **options)
    for n in SIZES:
        for seed in range(3):
            rank = random_ranks(n, seed) if seed else noisy_first_stage(n, seed)
            order, _, asked = drive(strategy, n, perfect_judge(rank))
            assert sorted(order) == list(range(n)), (n, "every candidate exactly once")
            truth = sorted(range(n), key=lambda c: rank[c])
            head = min(top_n, n)
            assert order[:head] == truth[:head], (n, seed)
            for window in asked:
                assert 2 <= len(window) <= window_size
                assert len(set(window)) == len(window)


@pytest.mark.parametrize("name", GUARANTEED)
def test_top_k_limits_reranking_to_the_head(name):
    strategy = get_strategy(name, window_size=10, top_n=4, top_k=30)
    rank = random_ranks(50, 7)
    order, _, asked = drive(strategy, 50, perfect_judge(rank))
    assert order[30:] == list(range(30, 50))
    assert all(c < 30 for window in asked for c in window)
    assert order[:4] == sorted(range(30), key=lambda c: rank[c])[:4]


def test_tournament_top10_of_100_with_window_20_takes_3_rounds_whatever_the_judge():
    strategy = get_strategy("tournament", window_size=20, top_n=10)
    for seed in range(10):
        order, rounds, asked = drive(strategy, 100, perfect_judge(random_ranks(100, seed)))
        assert rounds == 3
        assert len(asked) == 10


def test_tournament_heats_are_one_batch_of_disjoint_windows():
    plan = get_strategy("tournament", window_size=20, top_n=10).plan(100)
    heats = next(plan)
    assert len(heats) == 5
    assert sorted(c for window in heats for c in window) == list(range(100))


@pytest.mark.parametrize("n", [21, 60, 100, 200, 400])
def test_tournament_rounds_stay_within_the_documented_bound(n):
    import math

    strategy = get_strategy("tournament", window_size=20, top_n=10)
    _, rounds, _ = drive(strategy, n, perfect_judge(random_ranks(n, n)))
    heats = math.ceil(n / 20)
    assert rounds <= 1 + max(0, math.ceil(math.log2(heats / 3))) + 1


def test_tournament_with_top_n_over_half_the_window_still_guarantees_but_needs_more_rounds():
    wide = get_strategy("tournament", window_size=20, top_n=15)
    rank = random_ranks(100, 3)
    order, rounds, _ = drive(wide, 100, perfect_judge(rank))
    assert order[:15] == sorted(range(100), key=lambda c: rank[c])[:15]
    assert rounds > 3


def test_tdpart_takes_3_rounds_when_the_first_stage_is_decent():
    strategy = get_strategy("tdpart", window_size=20, top_n=10)
    rounds_seen = []
    slots = 0
    for seed in range(20):
        rank = noisy_first_stage(100, seed, spread=8.0)
        _, rounds, asked = drive(strategy, 100, perfect_judge(rank))
        rounds_seen.append(rounds)
        slots += sum(len(w) for w in asked)
    assert max(rounds_seen) <= 3
    assert slots / 20 < 0.8 * 180  # fewer passage slots than the sliding window's 180


@pytest.mark.parametrize("window_size,top_n", [(20, 10), (20, 5), (25, 8)])
def test_tdpart_with_pair_finish_never_takes_more_than_3_rounds(window_size, top_n):
    strategy = get_strategy("tdpart", window_size=window_size, top_n=top_n)
    repeating = get_strategy("tdpart", window_size=window_size, top_n=top_n, pair_finish=False)
    more = 0
    for seed in range(30):
        rank = random_ranks(100, seed)
        _, rounds, asked = drive(strategy, 100, perfect_judge(rank))
        assert rounds <= 3
        assert all(len(window) <= window_size for window in asked)
        _, repeat_rounds, _ = drive(repeating, 100, perfect_judge(rank))
        more += repeat_rounds > 3
    assert more > 0  # a random first stage beats the pivot often: repeating costs rounds


def test_tdpart_needs_no_final_window_when_nobody_beats_the_pivot():
    strategy = get_strategy("tdpart", window_size=20, top_n=10)
    order, rounds, asked = drive(strategy, 100, perfect_judge(list(range(100))))
    assert rounds == 2
    assert order[:10] == list(range(10))
    assert asked[1:] and all(window[0] == 9 for window in asked[1:])  # the pivot leads


def slips_below_the_pivot(true_rank: Sequence[int], slipping: int) -> Judge:
    """A perfect judge, but where ``slipping`` stands right above the pivot (place 9 of the
    first window) it slips just below it: one adjacent swap, as a noisy model makes."""
    perfect = perfect_judge(true_rank)
    first: list[int] = []

    def judge(window: list[int]) -> Sequence[int]:
        answer = list(perfect(window))
        if not first:
            first.extend(answer)
        elif window[0] == first[9] and slipping in window:
            cut = answer.index(window[0])
            if cut > 0 and answer[cut - 1] == slipping:
                answer[cut - 1], answer[cut] = answer[cut], slipping
        return answer

    return judge


def test_tdpart_final_window_takes_back_a_passage_that_slipped_below_the_pivot():
    # True top 10: the first stage's 0-7, then 30 and 55 (asked in two partition windows);
    # 55 slips below the pivot (9) when asked.
    rank = [100 + c for c in range(100)]
    for place, c in enumerate([*range(8), 30, 55, 9]):
        rank[c] = place
    best = sorted(range(100), key=lambda c: rank[c])[:10]
    tdpart = get_strategy("tdpart")
    order, rounds, asked = drive(tdpart, 100, slips_below_the_pivot(rank, 55))
    assert sorted(order[:10]) == sorted(best)
    assert rounds == 3 and len(asked[-1]) <= 20  # no extra round, no window over 20
    plain = get_strategy("tdpart", fill_final=False)
    order, plain_rounds, plain_asked = drive(plain, 100, slips_below_the_pivot(rank, 55))
    assert 55 not in order[:10]  # without the near misses it is lost
    assert plain_rounds == rounds and len(plain_asked) == len(asked)  # same windows, same rounds


def sinks(true_rank: Sequence[float], sinking: int, places: int, pivot: int = 9) -> Judge:
    """A perfect judge, except that in a window led by ``pivot`` (a partition window)
    ``sinking`` is answered ``places`` places below where it belongs: the cascade of adjacent
    swaps a noisy model makes."""
    perfect = perfect_judge(true_rank)

    def judge(window: list[int]) -> Sequence[int]:
        answer = list(perfect(window))
        if window[0] == pivot and sinking in answer:
            place = answer.index(sinking)
            answer.insert(min(place + places, len(answer) - 1), answer.pop(place))
        return answer

    return judge


def true_top_10(*extra: int) -> list[float]:
    """True ranks over 100: the first stage's 0-7, then ``extra``, then 8, 9, 10, ... (so the
    pivot window's 10th is the first stage's 8 or 9, and 10 or 11 comes right after it)."""
    rank = [100.0 + c for c in range(100)]
    for place, c in enumerate([*range(8), *extra, *(c for c in range(8, 20) if c not in extra)]):
        rank[c] = float(place)
    return rank


def test_tdpart_asks_again_when_the_only_passage_past_the_pivot_slipped_one_place():
    # True top 10: 0-8 and 55. 55 is asked in a partition window and slips one place: below
    # the pivot (9), above the guard (10). Nobody else beats the pivot.
    rank = true_top_10(8, 55)
    best = sorted(range(100), key=lambda c: rank[c])[:10]
    order, rounds, asked = drive(get_strategy("tdpart"), 100, sinks(rank, 55, 1))
    assert all(window[:2] == [9, 10] for window in asked[1:6])  # the pivot, then the guard
    assert sorted(order[:10]) == sorted(best)
    assert rounds == 3 and len(asked[-1]) <= 20
    plain = get_strategy("tdpart", guard=False)
    order, plain_rounds, _ = drive(plain, 100, sinks(rank, 55, 1))
    assert 55 not in order[:10] and plain_rounds == 2  # nothing marked it: the pivot window won


def test_tdpart_final_window_takes_back_a_passage_that_slipped_past_pivot_and_guard():
    # True top 10: 0-7, 30 and 55 (in two partition windows); 30 beats the pivot, 55 sinks
    # two places: below the pivot and below the guard.
    rank = true_top_10(30, 55)
    best = sorted(range(100), key=lambda c: rank[c])[:10]
    order, rounds, asked = drive(get_strategy("tdpart"), 100, sinks(rank, 55, 2))
    assert sorted(order[:10]) == sorted(best)
    assert rounds == 3 and all(len(window) <= 20 for window in asked)
    order, _, _ = drive(get_strategy("tdpart", guard=False), 100, sinks(rank, 55, 2))
    assert 55 not in order[:10]  # without the guard only the passage right below the pivot


def test_tdpart_needs_no_final_window_when_nothing_stands_between_pivot_and_guard():
    # Many passages between the pivot and the guard are their true place, not one slip.
    rank = true_top_10()
    for c in (30, 31, 55):
        rank[c] = 9.5  # between the pivot (9) and the guard (10), tied
    order, rounds, _ = drive(get_strategy("tdpart"), 100, perfect_judge(rank))
    assert rounds == 3 and order[:10] == list(range(10))  # one stands alone in its window
    for c in (55, 56, 57):
        rank[c] = 9.5  # now no window holds just one
    order, rounds, _ = drive(get_strategy("tdpart"), 100, perfect_judge(rank))
    assert rounds == 2 and order[:10] == list(range(10))


def noisy_judge(grades: Sequence[int], noise) -> Judge:
    from permrank.sim.noise import judge_order

    def judge(window: list[int]) -> Sequence[int]:
        answer = judge_order([grades[c] for c in window], noise, ",".join(map(str, window)))
        return [window[place] for place in answer]

    return judge


def test_tdpart_under_heavy_swap_noise_stays_near_sliding_in_3_rounds_for_fewer_passages():
    """Adjacent-swap noise 0.3 over the DL19 fixture (5 queries of 100), 100 noise seeds: the
    guarded tdpart keeps within 0.005 nDCG@10 of the sliding window, beats tdpart without the
    guard, takes 3 rounds at most and shows at most 0.8x the sliding window's passages."""
    from pathlib import Path

    from permrank.runs.evaluate import per_query, read_qrels
    from permrank.runs.io import read_requests
    from permrank.sim.noise import Noise

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "dl19-5q"
    qrels = read_qrels(fixtures / "qrels.txt")
    queries = {
        r.query.qid: [c.docid for c in r.candidates[:100]]
        for r in read_requests(fixtures / "candidates.jsonl")
    }
    strategies = {
        "sliding": get_strategy("sliding", window_size=20, step=10),
        "tdpart": get_strategy("tdpart"),
        "unguarded": get_strategy("tdpart", guard=False),
    }
    ndcg = dict.fromkeys(strategies, 0.0)
    shown = dict.fromkeys(strategies, 0)
    most_rounds = dict.fromkeys(strategies, 0)
    seeds = range(100)
    for seed in seeds:
        for label, strategy in strategies.items():
            runs = {}
            for qid, docids in queries.items():
                grades = [qrels[qid].get(d, 0) for d in docids]
                order, rounds, asked = drive(
                    strategy, len(docids), noisy_judge(grades, Noise(swap=0.3, seed=seed))
                )
                runs[qid] = {docids[c]: float(len(order) - place) for place, c in enumerate(order)}
                shown[label] += sum(len(window) for window in asked)
                most_rounds[label] = max(most_rounds[label], rounds)
            scores = per_query(runs, qrels, "nDCG@10")
            ndcg[label] += sum(scores.values()) / len(scores) / len(seeds)
    assert ndcg["tdpart"] >= ndcg["sliding"] - 0.005
    assert ndcg["tdpart"] > ndcg["unguarded"]
    assert most_rounds["tdpart"] == 3 and most_rounds["sliding"] == 9
    assert shown["tdpart"] <= 0.8 * shown["sliding"]


@pytest.mark.parametrize("name", GUARANTEED)
def test_top_n_not_smaller_than_window_is_refused(name):
    with pytest.raises(ConfigError, match="smaller than window_size"):
        get_strategy(name, window_size=10, top_n=10)


def test_parameters_of_another_strategy_are_refused_by_name():
    with pytest.raises(ConfigError, match="does not take step"):
        get_strategy("tournament", step=10)


def test_sliding_passes_and_early_stop():
    rank = random_ranks(100, 11)
    truth = sorted(range(100), key=lambda c: rank[c])
    three = get_strategy("sliding", passes=3)
    order, rounds, _ = drive(three, 100, perfect_judge(rank))
    assert rounds == 27
    assert order[:20] == truth[:20]  # each pass settles 10 more places
    early = get_strategy("sliding", passes=5, early_stop=True)
    order, rounds, _ = drive(early, 100, perfect_judge(rank))
    assert order[:10] == truth[:10]
    assert rounds < 45 and rounds % 9 == 0


def first_shown_wins(true_rank: Sequence[int]) -> Judge:
    """A position-biased judge: the passage shown first goes on top, the rest in true order."""

    def judge(window: list[int]) -> list[int]:
        return [window[0], *sorted(window[1:], key=lambda c: true_rank[c])]

    return judge


def test_selfconsistency_asks_all_shuffles_in_one_batch_and_keeps_the_inner_rounds():
    rank = random_ranks(100, 5)
    plain = get_strategy("tournament")
    wrapped = get_strategy("selfconsistency", inner="tournament", shuffles=4)
    _, plain_rounds, plain_asked = drive(plain, 100, perfect_judge(rank))
    order, rounds, asked = drive(wrapped, 100, perfect_judge(rank))
    assert rounds == plain_rounds
    assert len(asked) == 4 * len(plain_asked)
    assert sorted(order) == list(range(100))
    first = next(wrapped.plan(100))
    assert len(first) == 4 * 5
    assert len({tuple(w) for w in first}) == 20  # every copy in a different order


@pytest.mark.parametrize("aggregate", ["borda", "kemeny"])
def test_selfconsistency_cancels_a_first_position_bias(aggregate):
    rank = random_ranks(10, 2)
    truth = sorted(range(10), key=lambda c: rank[c])
    shown = list(reversed(truth))  # the worst passage is shown first
    biased = first_shown_wins(rank)
    assert biased(shown)[0] == truth[-1]
    wrapped = get_strategy("selfconsistency", inner="sliding", shuffles=7, aggregate=aggregate)
    order, _ = run_plan(wrapped.plan(10), lambda w: biased([shown[i] for i in w]))
    order = [shown[i] for i in order]
    assert order[0] == truth[0]
    assert truth[-1] not in order[:5]


def test_shuffles_are_seeded():
    a = next(get_strategy("selfconsistency", shuffles=3, seed=1).plan(30))
    b = next(get_strategy("selfconsistency", shuffles=3, seed=1).plan(30))
    c = next(get_strategy("selfconsistency", shuffles=3, seed=2).plan(30))
    assert a == b and a != c


def disagreements(order: list[int], answers: list[list[int]]) -> int:
    total = 0
    for answer in answers:
        place = {c: i for i, c in enumerate(answer)}
        total += sum(1 for i, a in enumerate(order) for b in order[i + 1 :] if place[a] > place[b])
    return total


def test_kemeny_is_never_further_from_the_answers_than_borda():
    rng = random.Random(0)
    for _ in range(50):
        window = list(range(8))
        answers = []
        for _ in range(5):
            answer = window[:]
            rng.shuffle(answer)
            answers.append(answer)
        k_order, b_order = kemeny(window, answers), borda(window, answers)
        assert sorted(k_order) == window
        assert disagreements(k_order, answers) <= disagreements(b_order, answers)


def test_borda_of_one_answer_is_that_answer():
    assert borda([0, 1, 2, 3], [[2, 0, 3, 1]]) == [2, 0, 3, 1]
    assert kemeny([0, 1, 2, 3], [[2, 0, 3, 1]]) == [2, 0, 3, 1]


def test_cover_pairs_puts_every_two_chains_in_a_window_of_bounded_size():
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 10) for _ in range(rng.randint(2, 7))]
        chains, start = [], 0
        for length in lengths:
            chains.append(list(range(start, start + length)))
            start += length
        windows = cover_pairs(chains, 20)
        assert all(len(w) <= 20 for w in windows)
        for a in range(len(chains)):
            for b in range(a + 1, len(chains)):
                assert any(chains[a][0] in w and chains[b][0] in w for w in windows)
        if sum(lengths) <= 20:
            assert len(windows) == 1


def test_copeland_order_recovers_a_consistent_total_order():
    rank = random_ranks(9, 4)
    judge = perfect_judge(rank)
    answers = [judge([0, 1, 2, 3, 4, 5]), judge([0, 1, 2, 6, 7, 8]), judge([3, 4, 5, 6, 7, 8])]
    assert copeland_order(list(range(9)), answers) == sorted(range(9), key=lambda c: rank[c])


def test_every_strategy_is_a_cli_choice():
    from permrank.cli.main import build_parser

    parser = build_parser()
    for name in STRATEGIES:
        args = parser.parse_args(["rerank", "--input", "x", "--output", "y", "--strategy", name])
        assert args.strategy == name


@pytest.mark.slow
def test_parallel_strategies_through_the_driver_match_sliding_in_fewer_rounds():
    from pathlib import Path

    from permrank.engine.reranker import Reranker
    from permrank.runs.evaluate import evaluate, read_qrels, run_of
    from permrank.runs.io import read_requests
    from permrank.sim.server import Corpus, Simulator

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "dl19-5q"
    corpus = Corpus.from_files(fixtures / "candidates.jsonl", fixtures / "qrels.txt")
    qrels = read_qrels(fixtures / "qrels.txt")
    results: dict[str, tuple[float, int, int, str]] = {}
    with Simulator(corpus) as sim:
        for name, options in [
            ("sliding", {}),
            ("tdpart", {}),
            ("tournament", {}),
            ("selfconsistency", {"strategy_options": {"inner": "tdpart", "shuffles": 2}}),
        ]:
            with Reranker("sim", sim.base_url, strategy=name, concurrency=16, **options) as r:
                requests = list(read_requests(fixtures / "candidates.jsonl"))[:3]
                rankings = r.rerank_batch(requests)
                results[name] = (
                    evaluate(run_of(rankings), qrels, ["nDCG@10"])["nDCG@10"],
                    max(x.usage.rounds for x in rankings),
                    sum(x.usage.calls for x in rankings),
                    r.manifest()["strategy"]["name"],
                )
    sliding = results["sliding"]
    assert sliding[1] == 9
    for name in ("tdpart", "tournament", "selfconsistency"):
        assert results[name][0] == pytest.approx(sliding[0], abs=1e-9), name
        assert results[name][1] <= 3
        assert results[name][3] == name
    assert results["selfconsistency"][2] > results["tdpart"][2]  # each window asked twice
