"""Shared timing helpers: interleaved repetitions, fastest times (devices are resolved by
:func:`rapa.config.resolve_device`, re-exported here: a bad name is one RapaError line)."""

from __future__ import annotations

import random
import time
from typing import Callable

import torch

from rapa.config import resolve_device

__all__ = ["balanced_order", "geomean", "resolve_device", "sync", "time_interleaved"]


def sync(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int = 5,
                     warmup: int = 1, shuffle: bool = True, seed: int | None = None) -> dict[str, float]:
    """Fastest seconds per call of every function, run round-robin so that noise on a shared
    machine hits all of them alike. The minimum, not the median: on a shared machine noise
    only ever adds time (other tenants, cache and memory-bandwidth contention, thread
    wake-ups), so the fastest repetition is the best estimate of each function's own cost.

    What runs just before a function is part of its time (the caches and the allocator it
    leaves), so with ``shuffle`` every function follows every other one equally often: the
    calls go round random circuits that hold each ordered pair of functions once
    (:func:`balanced_order`; ``seed``: their draw, default a new one at every call, without
    touching torch's generators), each function at least ``repeats`` times. In the fixed
    order (``shuffle=False``) ``nn.Conv2d`` always ran after the naive tiled layer: 1.05-1.11
    ms for the paper's conv1 at batch 10 there, 0.76 ms after another convolution, which
    flattered the conv table (README, Benchmarks)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    if shuffle and len(names) > 1:
        rng = random.Random(seed)
        order: list[str] = []
        for _ in range(-(-repeats // (len(names) - 1))):
            order += [names[i] for i in balanced_order(len(names), rng)]
    else:
        order = names * repeats
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name in order:
        fn = fns[name]
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        samples[name].append(time.perf_counter() - t)
    return {name: min(v) for name, v in samples.items()}


def balanced_order(n: int, rng: random.Random) -> list[int]:
    """A random order of ``n(n-1)`` visits to ``0..n-1`` in which every ordered pair ``(a, b)``,
    ``a != b``, is adjacent exactly once (the last visit followed by the first counts): an
    Eulerian circuit of the complete directed graph (Hierholzer), each node ``n-1`` times."""
    if n < 2:
        return list(range(n))
    out = {a: rng.sample([b for b in range(n) if b != a], n - 1) for a in range(n)}
    stack, circuit = [rng.randrange(n)], []
    while stack:
        v = stack[-1]
        if out[v]:
            stack.append(out[v].pop())
        else:
            circuit.append(stack.pop())
    return circuit[::-1][:-1]  # the circuit closes on its first node


def geomean(values: list[float]) -> float:
    """Geometric mean."""
    prod = 1.0
    for v in values:
        prod *= v
    return prod ** (1.0 / len(values))
