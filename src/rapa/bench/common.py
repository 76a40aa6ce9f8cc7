"""Shared timing helpers: interleaved repetitions, fastest times (devices are resolved by
:func:`rapa.config.resolve_device`, re-exported here: a bad name is one RapaError line)."""

from __future__ import annotations

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
                     warmup: int = 1) -> dict[str, float]:
    """Fastest seconds per call of every function, run round-robin so that noise on a shared
    machine hits all of them alike. The minimum, not the median: on a shared machine noise
    only ever adds time (other tenants, cache and memory-bandwidth contention, thread
    wake-ups), so the fastest repetition is the best estimate of each function's own cost."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
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
