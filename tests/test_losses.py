"""Ranking losses: values worked out by hand, finite-difference gradients, padding that changes
nothing. Needs torch (the ``train`` extra); skipped without it, except in CI where it must be."""

from __future__ import annotations

import math
import os

import pytest

if os.environ.get("CI"):
    import torch  # CI installs the train extra: a missing torch is a failure there
else:
    torch = pytest.importorskip("torch", reason="torch is in the train extra")

from permrank.core.errors import ConfigError
from permrank.distill.train.losses import (
    grouped_softmax_loss,
    lambda_loss,
    listmle_loss,
    listnet_loss,
    pad_lists,
    poly1_loss,
    rank_labels,
    ranknet_loss,
)

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(value: torch.Tensor, expected: float) -> bool:
    return math.isclose(float(value), expected, rel_tol=1e-9, abs_tol=1e-12)


# -- values by hand --------------------------------------------------------------------------------


def test_ranknet_by_hand() -> None:
    # One pair, the better item scored 1 higher: log(1 + e^-1).
    assert close(ranknet_loss(t(1.0, 0.0), t(1.0, 0.0)), math.log(1 + math.exp(-1)))
    # Three items, labels 2 > 1 > 0, scores 0, 1, 3: pairs (0,1) (0,2) (1,2), mean of three.
    expected = (math.log(1 + math.e) + math.log(1 + math.exp(3)) + math.log(1 + math.exp(2))) / 3
    assert close(ranknet_loss(t(0.0, 1.0, 3.0), t(2.0, 1.0, 0.0)), expected)
    # sigma scales the score difference; equal labels make no pair.
    assert close(ranknet_loss(t(1.0, 0.0), t(1.0, 0.0), sigma=2.0), math.log(1 + math.exp(-2)))
    assert close(
        ranknet_loss(t(1.0, 0.0, 5.0), t(1.0, 0.0, 1.0)),
        (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-5))) / 2,
    )


def test_listnet_by_hand() -> None:
    # Equal scores: p = (1/2, 1/2) whatever the target, so the cross-entropy is log 2.
    assert close(listnet_loss(t(0.0, 0.0), t(1.0, 0.0)), math.log(2))
    # q = softmax(1, 0), p = softmax(0, 1): -(q1 log p1 + q2 log p2).
    q1 = math.e / (math.e + 1)
    p1 = 1 / (1 + math.e)
    expected = -(q1 * math.log(p1) + (1 - q1) * math.log(1 - p1))
    assert close(listnet_loss(t(0.0, 1.0), t(1.0, 0.0)), expected)
    # The temperature divides the labels.
    q1 = math.exp(0.5) / (math.exp(0.5) + 1)
    expected = -(q1 * math.log(p1) + (1 - q1) * math.log(1 - p1))
    assert close(listnet_loss(t(0.0, 1.0), t(1.0, 0.0), temperature=2.0), expected)


def test_listmle_by_hand() -> None:
    # Scores already in the labels' order 2, 1, 0:
    # (log(e^2 + e^1 + e^0) - 2) + (log(e^1 + e^0) - 1) + (log e^0 - 0).
    expected = math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + math.exp(-1))
    assert close(listmle_loss(t(2.0, 1.0, 0.0), t(3.0, 2.0, 1.0)), expected)
    # The labels give the order, not the positions: label order is item 2, item 0, item 1.
    scores, labels = t(1.0, 0.0, 2.0), t(2.0, 1.0, 3.0)
    expected = (math.log(math.exp(2) + math.exp(1) + 1) - 2) + (math.log(math.exp(1) + 1) - 1)
    assert close(listmle_loss(scores, labels), expected)
    # Agreeing scores cost less than reversed ones.
    assert listmle_loss(t(2.0, 1.0, 0.0), t(3.0, 2.0, 1.0)) < listmle_loss(
        t(0.0, 1.0, 2.0), t(3.0, 2.0, 1.0)
    )


def test_lambda_loss_by_hand() -> None:
    # Labels (1, 0) but scores (0, 1): the relevant item sits at rank 2.
    # G = (1, 0) (maxDCG = 1); D_1 = 1, D_2 = log2 3; the pair's loss is w * log2(1 + e).
    scores, labels = t(0.0, 1.0), t(1.0, 0.0)
    swap = 1 - 1 / math.log2(3)  # |1/D_1 - 1/D_2|, also delta for ranks one apart
    log2_term = math.log2(1 + math.e)
    assert close(lambda_loss(scores, labels, weighting="lambdarank"), swap * log2_term)
    assert close(lambda_loss(scores, labels, weighting="ndcg2"), swap * log2_term)
    assert close(lambda_loss(scores, labels), (10 * swap + swap) * log2_term)
    assert close(lambda_loss(scores, labels, mu=2.0), (2 * swap + swap) * log2_term)
    # Grades 2, 1 at ranks 3, 1 (scores 0, 2, 1 over three items, the third of grade 0).
    scores, labels = t(0.0, 2.0, 1.0), t(2.0, 1.0, 0.0)
    max_dcg = 3 + 1 / math.log2(3)
    g = [3 / max_dcg, 1 / max_dcg, 0.0]
    inv = {1: 1.0, 2: 1 / math.log2(3), 3: 0.5}  # 1 / D_r
    ranks = [3, 1, 2]
    expected = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        weight = abs(g[i] - g[j]) * abs(inv[ranks[i]] - inv[ranks[j]])
        expected += weight * math.log2(1 + math.exp(-(float(scores[i]) - float(scores[j]))))
    assert close(lambda_loss(scores, labels, weighting="lambdarank"), expected)
    # With k = 1 only pairs with an item at rank 1 count: (0, 1) and (1, 2).
    max_dcg_1 = 3.0
    g = [3 / max_dcg_1, 1 / max_dcg_1, 0.0]
    expected_k = 0.0
    for i, j in ((0, 1), (1, 2)):
        weight = abs(g[i] - g[j]) * abs(inv[ranks[i]] - inv[ranks[j]])
        expected_k += weight * math.log2(1 + math.exp(-(float(scores[i]) - float(scores[j]))))
    assert close(lambda_loss(scores, labels, weighting="lambdarank", k=1), expected_k)


def test_poly1_by_hand() -> None:
    # Equal scores: CE = log 2 and p_t = sum q p = 1/2, so log 2 + epsilon / 2.
    assert close(poly1_loss(t(0.0, 0.0), t(1.0, 0.0)), math.log(2) + 0.5)
    assert close(poly1_loss(t(0.0, 0.0), t(1.0, 0.0), epsilon=0.0), math.log(2))
    # A one-hot target (tiny temperature): -log p_t + epsilon (1 - p_t).
    p_t = math.exp(2) / (math.exp(2) + 1 + 1)
    value = poly1_loss(t(2.0, 0.0, 0.0), t(1.0, 0.0, 0.0), epsilon=2.0, temperature=1e-3)
    assert close(value, -math.log(p_t) + 2.0 * (1 - p_t))


def test_grouped_softmax_by_hand() -> None:
    # Positive first scored 2, two negatives scored 0: -2 + log(e^2 + 2).
    assert close(grouped_softmax_loss(t(2.0, 0.0, 0.0)), math.log(1 + 2 * math.exp(-2)))
    # The positive elsewhere in the group.
    assert close(grouped_softmax_loss(t(0.0, 2.0, 0.0), positive=1), math.log(1 + 2 * math.exp(-2)))
    # Two groups: the mean.
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(3)) / 2
    assert close(grouped_softmax_loss(scores), expected)


# -- padding ---------------------------------------------------------------------------------------

LIST_LOSSES = {
    "ranknet": ranknet_loss,
    "listnet": listnet_loss,
    "listmle": listmle_loss,
    "lambda": lambda_loss,
    "lambda_k3": lambda score, label, mask=None: lambda_loss(score, label, mask, k=3),
    "poly1": poly1_loss,
}


def ragged(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    scores, labels = [], []
    for length in (5, 2, 4):
        scores.append(torch.randn(length, generator=generator, dtype=F64))
        labels.append(torch.randint(0, 4, (length,), generator=generator).to(F64))
    labels[1] = t(1.0, 0.0)  # every list has at least one pair to compare
    return scores, labels


def padded(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ragged lists of ``ragged(seed)`` padded: scores, labels, mask."""
    scores, labels = ragged(seed)
    padded_scores, mask = pad_lists(scores)
    padded_labels, _ = pad_lists(labels)
    return padded_scores, padded_labels, mask


@pytest.mark.parametrize("name", sorted(LIST_LOSSES))
def test_padding_changes_nothing(name: str) -> None:
    loss = LIST_LOSSES[name]
    scores, labels = ragged(0)
    padded_scores, padded_labels, mask = padded(0)
    one_by_one = sum(float(loss(s, y)) for s, y in zip(scores, labels, strict=True)) / len(scores)
    assert math.isclose(float(loss(padded_scores, padded_labels, mask)), one_by_one, rel_tol=1e-9)
    # Whatever the padding holds, the loss is the same and the padding gets no gradient.
    wild_scores = padded_scores.masked_fill(~mask, 1e6).requires_grad_(True)
    wild_labels = padded_labels.masked_fill(~mask, 9.0)
    value = loss(wild_scores, wild_labels, mask)
    assert math.isclose(float(value.detach()), one_by_one, rel_tol=1e-9)
    value.backward()
    assert wild_scores.grad is not None
    assert torch.all(wild_scores.grad[~mask] == 0)
    assert torch.all(torch.isfinite(wild_scores.grad))


def test_grouped_softmax_padding_changes_nothing() -> None:
    groups = [t(1.0, 0.5, -1.0, 0.2), t(0.3, 0.9)]
    scores, mask = pad_lists(groups)
    expected = sum(float(grouped_softmax_loss(g)) for g in groups) / 2
    assert math.isclose(float(grouped_softmax_loss(scores, mask)), expected, rel_tol=1e-9)
    with pytest.raises(ConfigError, match="positive"):
        grouped_softmax_loss(scores, mask, positive=3)


def test_pad_lists_and_rank_labels() -> None:
    values, mask = pad_lists([[1.0, 2.0, 3.0], [4.0]], pad=-1.0)
    assert values.tolist() == [[1.0, 2.0, 3.0], [4.0, -1.0, -1.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert rank_labels(4).tolist() == [4.0, 3.0, 2.0, 1.0]


def test_shapes_are_checked() -> None:
    with pytest.raises(ConfigError, match="differ"):
        listnet_loss(t(1.0, 2.0), t(1.0, 2.0, 3.0))
    with pytest.raises(ConfigError, match="weighting"):
        lambda_loss(t(1.0, 2.0), t(1.0, 0.0), weighting="ndcg9")  # type: ignore[arg-type]


# -- gradients by finite differences ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LIST_LOSSES))
def test_gradients_match_finite_differences(name: str) -> None:
    loss = LIST_LOSSES[name]
    padded_scores, padded_labels, mask = padded(1)
    # Scores far apart, so no finite-difference step reorders them (LambdaLoss's weights depend
    # on the current ranks, constant between ties).
    spread = (
        padded_scores + torch.arange(padded_scores.numel(), dtype=F64).view_as(padded_scores) * 0.37
    )
    spread.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: loss(s, padded_labels, mask), (spread,), eps=1e-6, atol=1e-6
    )


def test_grouped_softmax_gradient_matches_finite_differences() -> None:
    scores, mask = pad_lists([t(1.0, 0.5, -1.0, 0.2), t(0.3, 0.9)])
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: grouped_softmax_loss(s, mask), (scores,))


def test_a_student_learns_the_teacher_order_with_each_loss() -> None:
    """A few steps of gradient descent on free scores move them towards the labels' order."""
    labels = rank_labels(6, dtype=F64)
    for name, loss in LIST_LOSSES.items():
        scores = torch.zeros(6, dtype=F64).requires_grad_(True)
        for _ in range(50):
            scores.grad = None
            loss(scores, labels).backward()
            with torch.no_grad():
                scores -= 1.0 * scores.grad
        order = torch.argsort(scores.detach(), descending=True).tolist()
        assert order == [0, 1, 2, 3, 4, 5], name
