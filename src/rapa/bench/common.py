"""Shared timing helpers: interleaved repetitions, fastest times (devices are resolved by
:func:`rapa.config.resolve_device`, re-exported here: a bad name is one RapaError line)."""

from __future__ import annotations

import random
import time
from typing import Callable

import torch

from rapa.config import resolve_device

__all__ = ["geomean", "resolve_device", "sync", "time_interleaved"]


def sync(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int = 5,
                     warmup: int = 1, shuffle: bool = True, seed: int = 0) -> dict[str, float]:
    """Fastest seconds per call of every function, run round-robin so that noise on a shared
    machine hits all of them alike. The minimum, not the median: on a shared machine noise
    only ever adds time (other tenants, cache and memory-bandwidth contention, thread
    wake-ups), so the fastest repetition is the best estimate of each function's own cost.

    ``shuffle``: each round runs the functions in a new order (drawn from ``seed``, without
    touching torch's generators), so that every function follows every other one as often. In
    a fixed order each function always follows the same one, and what that one leaves behind
    (caches, allocator) is part of its time: ``nn.Conv2d`` timed after the naive tiled layer
    measured 1.05-1.11 ms for the paper's conv1 at batch 10, after another convolution 0.76
    (README, Benchmarks)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    rng = random.Random(seed)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        order = rng.sample(names, len(names)) if shuffle else names
        for name in order:
            fn = fns[name]
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t)
    return {name: min(v) for name, v in samples.items()}


def geomean(values: list[float]) -> float:
    """Geometric mean."""
    prod = 1.0
    for v in values:
        prod *= v
    return prod ** (1.0 / len(values))
