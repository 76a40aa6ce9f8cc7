"""Majority voting over repeated random tile assignments (SPEC §3, paper §3.1 and §4).

Every forward pass of a randomly tiled net draws a new assignment of patches to tiles,
also in evaluation, so repeated passes give different predictions. The final label is
the most frequent class; ties go to the tied class with the largest mean softmax.
:func:`adaptive_vote` spends the extra passes only on uncertain images (the paper's
discussion), stopping each image as soon as its winner can no longer change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def vote_counts(logits_stack: Tensor) -> Tensor:
    """Votes per class ``(N, classes)`` from a stack of logits ``(votes, N, classes)``."""
    v, n, k = logits_stack.shape
    counts = torch.zeros(n, k, dtype=torch.long, device=logits_stack.device)
    return counts.scatter_add_(1, logits_stack.argmax(2).T, torch.ones(n, v, dtype=torch.long,
                                                                         device=logits_stack.device))


def vote_predictions(logits_stack: Tensor) -> Tensor:
    """Majority vote ``(N,)`` of a stack of logits ``(votes, N, classes)``.

    Each pass votes for its argmax class; the most frequent class wins, ties are broken
    by the mean softmax over the passes.
    """
    if logits_stack.dim() != 3 or logits_stack.shape[0] < 1:
        raise ValueError(f"logits_stack of shape {tuple(logits_stack.shape)}: expected (votes >= 1, N, classes)")
    counts = vote_counts(logits_stack)  # (N, classes)
    mean_prob = logits_stack.float().softmax(2).mean(0)  # (N, classes)
    tied = counts == counts.max(1, keepdim=True).values  # (N, classes): the leading classes
    return torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(1)  # (N,)


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return fallback if p is None else p.device


def _passes(model: nn.Module, images: Tensor, votes: int, batch_size: int | None) -> Tensor:
    """Logits ``(votes, N, classes)`` of ``votes`` forward passes, in batches of ``batch_size``."""
    device = _model_device(model, images.device)
    bs = images.shape[0] if batch_size is None else batch_size
    chunks = []
    for start in range(0, images.shape[0], max(bs, 1)):  # loop over batches, not images
        x = images[start:start + bs].to(device)
        chunks.append(torch.stack([model(x) for _ in range(votes)]))  # (votes, b, classes)
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def majority_vote(model: nn.Module, images: Tensor, votes: int = 9, batch_size: int | None = None) -> Tensor:
    """Labels ``(N,)`` by majority vote over ``votes`` forward passes in evaluation mode.

    A randomly tiled net redraws its assignment on every pass. ``batch_size`` bounds how
    many images go through the net at once (``None``: all). The model's mode is restored.
    """
    _check_int("votes", votes, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    try:
        stack = _passes(model, images, votes, batch_size)  # (votes, N, classes)
    finally:
        model.train(was_training)
    return vote_predictions(stack).to(images.device)


@torch.no_grad()
def adaptive_vote(
    model: nn.Module,
    images: Tensor,
    max_votes: int = 9,
    threshold: float = 0.9,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Majority vote that runs extra passes only for uncertain images.

    One pass for all images; an image whose largest softmax is at least ``threshold``
    keeps that prediction. The others get more passes, one at a time, until their
    winner is certain (its lead over the runner-up exceeds the passes left) or
    ``max_votes`` passes are done; the result equals :func:`vote_predictions` over the
    passes run. ``threshold`` is not from the paper (it gives none). Returns
    ``(labels (N,), passes_per_image (N,))``.
    """
    _check_int("max_votes", max_votes, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1]")
    was_training = model.training
    model.eval()
    try:
        first = _passes(model, images, 1, batch_size)[0]  # (N, classes)
        n, k = first.shape
        dev = first.device
        labels = first.argmax(1)  # (N,)
        passes = torch.ones(n, dtype=torch.long, device=dev)
        active = torch.nonzero(first.float().softmax(1).amax(1) < threshold).flatten()  # (A,)
        counts = torch.zeros(n, k, dtype=torch.long, device=dev)
        counts[torch.arange(n, device=dev), labels] = 1
        prob_sum = first.float().softmax(1)  # (N, classes)
        for done in range(1, max_votes):  # one extra pass per round for the still-open images
            if active.numel() == 0:
                break
            logits = _passes(model, images[active.to(images.device)], 1, batch_size)[0]  # (A, classes)
            counts[active, logits.argmax(1)] += 1
            prob_sum[active] += logits.float().softmax(1)
            passes[active] += 1
            top2 = counts[active].topk(min(2, k), dim=1).values  # (A, 2)
            lead = top2[:, 0] - (top2[:, 1] if k > 1 else 0)  # (A,)
            active = active[lead <= max_votes - (done + 1)]  # still undecided
    finally:
        model.train(was_training)
    tied = counts == counts.max(1, keepdim=True).values  # (N, classes)
    labels = torch.where(tied, prob_sum / passes.unsqueeze(1), torch.full_like(prob_sum, -1.0)).argmax(1)
    return labels.to(images.device), passes.to(images.device)
