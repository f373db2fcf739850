"""Run strategies with a Python function as the judge: no model, no server, no network.

    python examples/strategies.py

A strategy only plans windows and merges their answers, so a function that orders a window is
all it needs. Here the judge knows a hidden relevance for each of 100 candidates and answers
every window perfectly; each strategy must then put the true top 10 first, in order.
"""

import random

from permrank import SlidingWindow, TopDownPartition, Tournament, run_plan

rng = random.Random(0)
# hidden relevance of candidates 0..99; like a first stage, the input order is roughly right
relevance = [-i + rng.gauss(0, 25) for i in range(100)]
true_top10 = sorted(range(100), key=lambda i: -relevance[i])[:10]

strategies = [
    SlidingWindow(window_size=20, step=10),
    Tournament(window_size=20, top_n=10),  # or get_strategy("tournament", top_n=10)
    TopDownPartition(window_size=20, top_n=10),
]
shown: list[int] = []  # the size of every window a strategy asked for


def judge(window: list[int]) -> list[int]:
    """A perfect judge: the window's candidates, most relevant first."""
    shown.append(len(window))
    return sorted(window, key=lambda i: -relevance[i])


for strategy in strategies:
    shown.clear()
    order, rounds = run_plan(strategy.plan(100), judge)
    print(
        f"{strategy.name:<10} {rounds} rounds, {len(shown):2} windows, "
        f"{sum(shown)} passages shown, true top 10 first: {order[:10] == true_top10}"
    )
