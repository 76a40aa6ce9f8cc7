"""Voting on a trained run (paper §3.5, SPEC §3): its test errors, and one pass against a vote per image.

* :func:`evaluate_run`: the single-pass, majority-vote and adaptive-vote test errors
  (fractions) of a run's net, with its tile draws seeded as ``rapa train`` seeds the ones
  of its summary (``rapa eval`` prints them).
* :func:`voting_run`: per test image, whether one pass and a ``votes``-vote majority are
  right (errors in percent, and the images only one of them gets right: McNemar's counts);
  the sweeps cache it as ``voting.json`` (:func:`save_voting`, :func:`read_voting`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rapa import rundir
from rapa.analysis.common import iter_batches, model_device
from rapa.config import TrainConfig
from rapa.data import ImageData
from rapa.train import evaluate
from rapa.voting import vote_predictions

__all__ = ["VOTING_FILE_KEYS", "evaluate_run", "read_voting", "save_voting", "voting_run"]

VOTING_FILE_KEYS = {"single_error": "single_error_percent", "vote_error": "vote_error_percent"}
"""How ``voting.json`` names its errors (percent; :func:`rapa.rundir.file_keys`)."""


def evaluate_run(model: nn.Module, config: TrainConfig, data: ImageData, votes: int, threshold: float,
                 seed: int, run_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`rapa.train.evaluate` of a run's ``model`` on ``data`` (tile draws seeded by
    ``seed``, on ``config.device`` in batches of ``config.eval_batch_size``). Returns
    ``{"run_dir", "dataset", "test_images", "single_error", "vote_error", "votes",
    "adaptive_error", "adaptive_mean_passes"}`` (errors as fractions)."""
    torch.manual_seed(seed)
    res = evaluate(model, data, votes, config.device, config.eval_batch_size, threshold)
    return {"run_dir": str(run_dir), "dataset": config.dataset, "test_images": len(data),
            "single_error": res["single"], "vote_error": res["vote"], "votes": votes,
            "adaptive_error": res["adaptive"], "adaptive_mean_passes": res["adaptive_passes"]}


@torch.no_grad()
def voting_run(model: nn.Module, data: Any, votes: int = 9, seed: int = 0, run_dir: str | Path | None = None,
               limit: int | None = None, batch_size: int = 500) -> dict[str, Any]:
    """Per-image comparison of one pass and a ``votes``-vote majority on ``data`` (evaluation
    mode, draws seeded by ``seed``): the record of ``voting.json`` with ``limit`` (the test
    images asked for), ``images``, ``votes``, ``single_error`` and ``vote_error`` (percent),
    ``only_single_right`` and ``only_vote_right`` (counts)."""
    model.eval()
    torch.manual_seed(seed)
    n = wrong1 = wrongv = b = c = 0
    for x, y in iter_batches(data, batch_size, model_device(model)):
        stack = torch.stack([model(x) for _ in range(votes)])  # (votes, N, classes)
        ok1 = stack[0].argmax(1) == y  # (N,) the first pass alone
        okv = vote_predictions(stack) == y  # (N,)
        n += y.shape[0]
        wrong1 += int((~ok1).sum())
        wrongv += int((~okv).sum())
        b += int((ok1 & ~okv).sum())
        c += int((~ok1 & okv).sum())
    return {"run_dir": str(run_dir), "limit": limit, "images": n, "votes": votes,
            "single_error": 100.0 * wrong1 / n, "vote_error": 100.0 * wrongv / n,
            "only_single_right": b, "only_vote_right": c}


def save_voting(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (:func:`voting_run`) as ``folder``'s ``voting.json``; returns its path."""
    return rundir.write_result(folder, "voting", record, VOTING_FILE_KEYS)


def read_voting(run_dir: str | Path, fresh: bool = False) -> dict[str, Any] | None:
    """The ``voting.json`` of ``run_dir`` with rapa's own keys (None: none; ``fresh``: none
    newer than the run's checkpoint)."""
    return rundir.read_result(run_dir, "voting", VOTING_FILE_KEYS, fresh)
