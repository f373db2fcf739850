"""Ranking losses for training a student on a teacher's orders (needs ``permrank[train]``: torch).

Every loss takes a batch of lists: ``scores`` (the student's, ``[batch, list]``), ``labels`` (the
targets, higher is better: qrels grades, or scores derived from the teacher's ranks with
``rank_labels``) and an optional boolean ``mask`` (``True`` for real items, ``False`` for
padding), so lists of unequal length go in one batch (``pad_lists`` builds the three). A single
list may be given as a 1-D tensor. Padded items never change a loss nor receive a gradient, and
the result is the mean over the lists of the batch (lists without any real item, or without any
pair to compare, are left out of the mean).

- ``ranknet_loss``: pairwise logistic loss over every pair with different labels (RankNet);
- ``listnet_loss``: softmax cross-entropy between the labels' and the scores' top-one
  distributions (ListNet);
- ``listmle_loss``: negative log-likelihood of the labels' order under the Plackett-Luce model
  of the scores (ListMLE);
- ``lambda_loss``: pairwise logistic loss weighted by NDCG changes (LambdaLoss; the NDCG-Loss2++
  weighting by default, LambdaRank's and NDCG-Loss2's on request);
- ``poly1_loss``: Poly-1 over the listwise softmax: ListNet's cross-entropy plus
  ``epsilon * (1 - p_t)``, ``p_t`` the probability the scores give to the target distribution;
- ``grouped_softmax_loss``: one positive against its hard negatives, softmax cross-entropy
  (the loss FlagEmbedding's reranker trainer uses on grouped records).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from permrank.core.errors import ConfigError

__all__ = [
    "grouped_softmax_loss",
    "lambda_loss",
    "listmle_loss",
    "listnet_loss",
    "pad_lists",
    "poly1_loss",
    "rank_labels",
    "ranknet_loss",
]


# -- inputs ---------------------------------------------------------------------------------------


def pad_lists(
    lists: Sequence[Sequence[float] | Tensor], *, pad: float = 0.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Lists of unequal length -> (``[batch, longest]`` values, boolean mask of real items)."""
    if not lists:
        raise ConfigError("pad_lists needs at least one list")
    longest = max(len(values) for values in lists)
    tensors = [torch.as_tensor(values, dtype=dtype) for values in lists]
    dtype = dtype or tensors[0].dtype
    out = torch.full((len(lists), longest), pad, dtype=dtype)
    mask = torch.zeros((len(lists), longest), dtype=torch.bool)
    for row, values in enumerate(tensors):
        out[row, : len(values)] = values.to(dtype)
        mask[row, : len(values)] = True
    return out, mask


def rank_labels(length: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Labels from a teacher's order: ``length`` for its first item down to 1 for its last."""
    return torch.arange(length, 0, -1, dtype=dtype)


def _batch(
    scores: Tensor, labels: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Any, Tensor]:  # labels: None exactly when None was given
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
        labels = labels.unsqueeze(0) if labels is not None else None
        mask = mask.unsqueeze(0) if mask is not None else None
    if scores.dim() != 2:
        raise ConfigError(
            f"scores must be [batch, list] or [list] (got shape {tuple(scores.shape)})"
        )
    if labels is not None and labels.shape != scores.shape:
        raise ConfigError(
            f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)} differ in shape"
        )
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    elif mask.shape != scores.shape:
        raise ConfigError(f"mask {tuple(mask.shape)} and scores {tuple(scores.shape)} differ")
    return scores, labels, mask.bool()


def _very_negative(tensor: Tensor) -> float:
    """A finite stand-in for minus infinity: exp() of it is 0, arithmetic on it stays finite."""
    return torch.finfo(tensor.dtype).min / 4


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return values.masked_fill(~mask, _very_negative(values))


def _mean_over(per_list: Tensor, counted: Tensor) -> Tensor:
    """Mean of ``per_list`` over the lists marked in ``counted`` (0 with a graph when none)."""
    if not bool(counted.any()):
        return per_list.sum() * 0.0
    return per_list[counted].mean()


# -- pairwise --------------------------------------------------------------------------------


def _pairs(labels: Tensor, mask: Tensor) -> Tensor:
    """[batch, i, j]: True where item i should rank above item j (both real)."""
    both = mask.unsqueeze(2) & mask.unsqueeze(1)
    return (labels.unsqueeze(2) > labels.unsqueeze(1)) & both


def ranknet_loss(
    scores: Tensor, labels: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0
) -> Tensor:
    """RankNet: ``log(1 + exp(-sigma (s_i - s_j)))`` averaged over the pairs with y_i > y_j.

    Each list's loss is the mean over its pairs; the result is the mean over lists.
    """
    scores, labels, mask = _batch(scores, labels, mask)
    assert labels is not None
    pairs = _pairs(labels, mask)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)
    losses = torch.nn.functional.softplus(-sigma * diff) * pairs
    counts = pairs.sum(dim=(1, 2))
    per_list = losses.sum(dim=(1, 2)) / counts.clamp(min=1)
    return _mean_over(per_list, counts > 0)


def _ranks_by(scores: Tensor, mask: Tensor) -> Tensor:
    """1-based rank of each item when sorted by score, best first (padding ranked last)."""
    order = torch.argsort(_masked(scores.detach(), mask), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


Weighting = Literal["ndcg2pp", "lambdarank", "ndcg2"]


def lambda_loss(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    weighting: Weighting = "ndcg2pp",
    mu: float = 10.0,
    sigma: float = 1.0,
    k: int | None = None,
) -> Tensor:
    """LambdaLoss (Wang et al., 2018): ``-sum w_ij log2 sigmoid(sigma (s_i - s_j))`` over y_i > y_j.

    Gains ``G_i = (2^y_i - 1) / maxDCG@k``, discounts ``D_r = log2(1 + r)`` at the items'
    current ranks r by score. Weights: ``lambdarank`` ``|G_i - G_j| |1/D_ri - 1/D_rj|`` (the
    NDCG change of swapping i and j); ``ndcg2`` ``|G_i - G_j| delta_ij`` with
    ``delta_ij = |1/D_|ri-rj| - 1/D_(|ri-rj|+1)|``; ``ndcg2pp`` (NDCG-Loss2++, the default)
    ``mu * ndcg2 + lambdarank``. With ``k``, pairs whose both items rank below k are left out.
    Each list's loss is its sum over pairs; the result is the mean over lists.
    """
    if weighting not in ("ndcg2pp", "lambdarank", "ndcg2"):
        raise ConfigError(f"weighting must be ndcg2pp, lambdarank or ndcg2 (got {weighting!r})")
    scores, labels, mask = _batch(scores, labels, mask)
    assert labels is not None
    labels = labels.to(scores.dtype).masked_fill(~mask, 0.0)
    size = scores.shape[1]
    cutoff = size if k is None else min(k, size)
    positions = torch.arange(1, size + 1, device=scores.device, dtype=scores.dtype)
    discounts = torch.log2(1.0 + positions)
    ideal = torch.sort(labels, dim=1, descending=True).values
    max_dcg = ((2.0**ideal - 1.0) / discounts)[:, :cutoff].sum(dim=1, keepdim=True)
    gains = (2.0**labels - 1.0) / max_dcg.clamp(min=1e-12)

    ranks = _ranks_by(scores, mask)
    inverse_discount = 1.0 / torch.log2(1.0 + ranks.to(scores.dtype))
    gain_gap = (gains.unsqueeze(2) - gains.unsqueeze(1)).abs()
    lambdarank = gain_gap * (inverse_discount.unsqueeze(2) - inverse_discount.unsqueeze(1)).abs()
    if weighting == "lambdarank":
        weights = lambdarank
    else:
        gap = (ranks.unsqueeze(2) - ranks.unsqueeze(1)).abs().to(scores.dtype)
        delta = (1.0 / torch.log2(1.0 + gap.clamp(min=1.0)) - 1.0 / torch.log2(2.0 + gap)).abs()
        ndcg2 = gain_gap * delta
        weights = ndcg2 if weighting == "ndcg2" else mu * ndcg2 + lambdarank

    pairs = _pairs(labels, mask)
    if k is not None:
        pairs = pairs & (torch.minimum(ranks.unsqueeze(2), ranks.unsqueeze(1)) <= k)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)
    log2_sigmoid = torch.nn.functional.logsigmoid(sigma * diff) / math.log(2.0)
    per_list = -(weights.detach() * log2_sigmoid * pairs).sum(dim=(1, 2))
    return _mean_over(per_list, pairs.any(dim=(1, 2)))


# -- listwise --------------------------------------------------------------------------------


def _target_distribution(
    labels: Tensor, mask: Tensor, temperature: float, dtype: torch.dtype
) -> Tensor:
    labels = labels.to(dtype) / temperature
    return torch.softmax(_masked(labels, mask), dim=1) * mask


def listnet_loss(
    scores: Tensor, labels: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """ListNet: ``-sum q_i log p_i``, ``q = softmax(labels / temperature)``, ``p = softmax(s)``."""
    scores, labels, mask = _batch(scores, labels, mask)
    assert labels is not None
    target = _target_distribution(labels, mask, temperature, scores.dtype)
    log_p = torch.log_softmax(_masked(scores, mask), dim=1)
    per_list = -(target * log_p.masked_fill(~mask, 0.0)).sum(dim=1)
    return _mean_over(per_list, mask.any(dim=1))


def poly1_loss(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    epsilon: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """Poly-1 (Leng et al., 2022) over the listwise softmax: ``CE(q, p) + epsilon (1 - sum q p)``.

    ``q = softmax(labels / temperature)`` and ``p = softmax(scores)`` as in ListNet; with a
    one-hot q (a small temperature) this is ``-log p_t + epsilon (1 - p_t)``.
    """
    scores, labels, mask = _batch(scores, labels, mask)
    assert labels is not None
    target = _target_distribution(labels, mask, temperature, scores.dtype)
    log_p = torch.log_softmax(_masked(scores, mask), dim=1).masked_fill(~mask, 0.0)
    cross_entropy = -(target * log_p).sum(dim=1)
    p_target = (target * log_p.exp() * mask).sum(dim=1)
    per_list = cross_entropy + epsilon * (1.0 - p_target)
    return _mean_over(per_list, mask.any(dim=1))


def listmle_loss(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """ListMLE: ``sum_i [log sum_{j >= i} exp(s_pi_j) - s_pi_i]``, pi the order of the labels.

    Ties in the labels keep the items' list order.
    """
    scores, labels, mask = _batch(scores, labels, mask)
    assert labels is not None
    order = torch.argsort(
        _masked(labels.to(scores.dtype), mask), dim=1, descending=True, stable=True
    )
    ordered = torch.gather(_masked(scores, mask), 1, order)
    real = torch.gather(mask, 1, order)
    # log-sum-exp of every suffix: a cumulative log-sum-exp from the end.
    suffix = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
    per_list = ((suffix - ordered) * real).sum(dim=1)
    return _mean_over(per_list, mask.any(dim=1))


def grouped_softmax_loss(
    scores: Tensor, mask: Tensor | None = None, *, positive: int = 0
) -> Tensor:
    """One positive against hard negatives: ``-s_pos + log sum_j exp(s_j)`` (cross-entropy).

    ``scores`` is ``[groups, 1 + negatives]`` with the positive at index ``positive`` (0, as
    in grouped records: the positive first, then its negatives).
    """
    scores, _, mask = _batch(scores, None, mask)
    if not 0 <= positive < scores.shape[1]:
        raise ConfigError(f"positive index {positive} is outside groups of {scores.shape[1]}")
    if not bool(mask[:, positive].all()):
        raise ConfigError("every group needs its positive (the mask hides one)")
    log_p = torch.log_softmax(_masked(scores, mask), dim=1)
    per_list = -log_p[:, positive]
    return per_list.mean()
