"""Majority voting over repeated passes against hand-worked answers and a slow reference (SPEC §3)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn

from rapa.models import ConvNet
from rapa.voting import adaptive_vote, majority_vote, vote_counts, vote_predictions


def _slow_vote(stack: torch.Tensor) -> list[int]:
    """Most frequent argmax per image; among the tied classes the largest mean softmax."""
    labels = []
    for i in range(stack.shape[1]):
        votes = Counter(int(stack[v, i].argmax()) for v in range(stack.shape[0]))
        top = max(votes.values())
        tied = [c for c, n in votes.items() if n == top]
        mean = [sum(float(stack[v, i].softmax(0)[c]) for v in range(stack.shape[0])) for c in tied]
        labels.append(tied[mean.index(max(mean))])
    return labels


class _Scripted(nn.Module):
    """Returns ``table[call, image]`` where ``call`` counts the passes each image has had.

    Images are given as their index (shape (N, 1)), so any batching works.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (passes, N, classes)
        self.calls = torch.zeros(table.shape[1], dtype=torch.long)
        self.modes: list[bool] = []

    def forward(self, x):
        ids = x[:, 0].long()
        self.modes.append(self.training)
        out = self.table[self.calls[ids], ids]
        self.calls[ids] += 1
        return out


def _onehot_logits(classes, k=4, scale=1.0):
    return torch.nn.functional.one_hot(torch.tensor(classes), k).double() * scale


def test_majority_beats_confidence():
    # image votes: A (very confident), B, B (barely): B wins although A's mean softmax is larger
    stack = torch.tensor([[[100.0, 0.0]], [[0.0, 0.1]], [[0.0, 0.1]]])  # (3, 1, 2)
    assert stack.softmax(2).mean(0)[0, 0] > stack.softmax(2).mean(0)[0, 1]
    assert vote_predictions(stack).tolist() == [1]


def test_tie_broken_by_mean_softmax_in_any_order():
    a = torch.tensor([[10.0, 0.0, 0.0]])  # votes 0, confident
    b = torch.tensor([[0.9, 0.0, 1.0]])  # votes 2, barely
    for stack in (torch.stack([a, b]), torch.stack([b, a])):
        assert vote_predictions(stack).tolist() == [0]
    c = torch.tensor([[1.0, 0.0, 0.9]])  # votes 0, barely
    d = torch.tensor([[0.0, 0.0, 10.0]])  # votes 2, confident
    assert vote_predictions(torch.stack([c, d])).tolist() == [2]


def test_vote_predictions_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(9, 300, 3, generator=g, dtype=torch.float64)  # 3 classes: many ties
    assert vote_predictions(stack).tolist() == _slow_vote(stack)
    counts = vote_counts(stack)
    assert counts.sum(1).tolist() == [9] * 300
    assert vote_predictions(stack[:1]).tolist() == stack[0].argmax(1).tolist()
    with pytest.raises(ValueError, match="logits_stack"):
        vote_predictions(stack[0])


@pytest.mark.parametrize("batch_size", [None, 2, 5])
def test_majority_vote_runs_votes_passes_in_eval(batch_size):
    # per image over the passes: 1,1,1,0,0,0,2,2,1 -> 1; 0,2,2,3,3,2,0,0,2 -> 2;
    # 3,1,1,2,2,2,0,0,1 -> tie of 1 and 2, broken by mean softmax (the logit scale grows per pass)
    per_image = [[1, 1, 1, 0, 0, 0, 2, 2, 1], [0, 2, 2, 3, 3, 2, 0, 0, 2], [3, 1, 1, 2, 2, 2, 0, 0, 1]]
    table = torch.stack([_onehot_logits([img[p] for img in per_image], scale=1 + 0.1 * p)
                         for p in range(9)])  # (9, 3, 4)
    model = _Scripted(table).train()
    images = torch.arange(3.0).view(3, 1)
    labels = majority_vote(model, images, votes=9, batch_size=batch_size)
    assert labels.dtype == torch.long and labels.shape == (3,)
    assert labels.tolist()[:2] == [1, 2]
    assert labels.tolist() == _slow_vote(table)
    assert model.calls.tolist() == [9, 9, 9]
    assert model.training and not any(model.modes)  # passes in eval, mode restored


def test_majority_vote_known_answer():
    classes = [[1, 2], [1, 2], [3, 0], [1, 0], [2, 0]]  # image 0 -> 1 (3 votes); image 1 -> 0 (3 votes)
    table = torch.stack([_onehot_logits(c) for c in classes])
    labels = majority_vote(_Scripted(table), torch.arange(2.0).view(2, 1), votes=5)
    assert labels.tolist() == [1, 0]


def test_majority_vote_of_untiled_net_is_its_prediction():
    torch.manual_seed(1)
    net = ConvNet(tiles=None, channels=(4, 4, 8))
    with torch.no_grad():
        for layer in net.convs:
            layer.weight.normal_(0, 0.2)
        net.fc.weight.normal_(0, 0.5)
    x = torch.randn(6, 3, 32, 32)
    expected = net.eval()(x).argmax(1)
    net.train()
    assert torch.equal(majority_vote(net, x, votes=3, batch_size=4), expected)
    assert net.training


def test_adaptive_vote_spends_passes_only_on_uncertain_images():
    n_pass = 9
    confident = [_onehot_logits([0], scale=20.0)[0]] * n_pass  # softmax ~ 1
    unanimous = [_onehot_logits([2], scale=0.5)[0]] * n_pass  # uncertain but always class 2
    alternating = [_onehot_logits([1 + (i % 2)], scale=0.5)[0] for i in range(n_pass)]  # 1,2,1,2,...
    table = torch.stack([torch.stack([a, b, c]) for a, b, c in zip(confident, unanimous, alternating)])
    model = _Scripted(table)
    labels, passes = adaptive_vote(model, torch.arange(3.0).view(3, 1), max_votes=9, threshold=0.9)
    # unanimous: after 5 passes the lead 5 exceeds the 4 passes left; alternating needs all 9
    assert passes.tolist() == [1, 5, 9]
    assert model.calls.tolist() == [1, 5, 9]
    assert labels.tolist() == [0, 2, 1]  # alternating: 5 votes for class 1, 4 for class 2


def test_adaptive_vote_threshold_zero_is_one_pass_and_one_is_full_vote():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(7, 50, 3, generator=g, dtype=torch.float64)
    labels, passes = adaptive_vote(_Scripted(table), torch.arange(50.0).view(50, 1), max_votes=7, threshold=0.0)
    assert passes.tolist() == [1] * 50 and labels.tolist() == table[0].argmax(1).tolist()
    labels, passes = adaptive_vote(_Scripted(table), torch.arange(50.0).view(50, 1), max_votes=7, threshold=1.0)
    # stopping early never changes the winner of the full vote
    assert labels.tolist() == _slow_vote(table)
    for i, p in enumerate(passes.tolist()):
        assert labels[i].item() == _slow_vote(table[:p, i:i + 1])[0]
    assert passes.min().item() >= 4 and passes.max().item() <= 7


def test_bad_arguments_raise():
    model = _Scripted(torch.zeros(1, 1, 2))
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="votes=0"):
        majority_vote(model, x, votes=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        majority_vote(model, x, batch_size=0)
    with pytest.raises(ValueError, match="threshold=1.5"):
        adaptive_vote(model, x, threshold=1.5)
    with pytest.raises(ValueError, match="max_votes=0"):
        adaptive_vote(model, x, max_votes=0)
