"""Ranking losses on a teacher's orders (needs the train extra: torch's CPU build).

    python examples/losses.py

Each loss takes a batch of lists: the student's scores, labels (higher is better; here derived
from the teacher's order) and a mask, so that lists of unequal length share one batch.
"""

import torch

from permrank.distill.train.losses import (
    lambda_loss,
    listmle_loss,
    listnet_loss,
    pad_lists,
    rank_labels,
)

# Two queries: the student's scores of each query's candidates, listed in the teacher's order.
scores, mask = pad_lists([[0.3, 1.2, -0.5], [2.0, 0.1]])
labels, _ = pad_lists([rank_labels(3), rank_labels(2)])  # 3, 2, 1 and 2, 1: the teacher's order
scores.requires_grad_(True)

for loss_fn in (listnet_loss, listmle_loss, lambda_loss):
    loss = loss_fn(scores, labels, mask)
    (gradient,) = torch.autograd.grad(loss, scores)
    first = ", ".join(f"{g:+.3f}" for g in gradient[0].tolist())
    # descent raises the teacher's first (scored too low) and lowers the second
    padding = gradient[1, 2].item()
    print(f"{loss_fn.__name__:<12} {loss.item():.4f}  gradient [{first}], padding {padding:.1f}")
