"""Per-thread scratch buffers and index tables of the CPU convolutions, kept between calls.

A freshly allocated buffer of a few MB is page-faulted in on first touch, which costs more
than the gather or matmul that fills it (measured: 1.1 ms against 0.1 ms for a 4 MB patch
matrix). Buffers only ever hold data inside one call, so reusing them across layers and
calls is safe; they grow to the largest size seen. Both the PyTorch path
(:mod:`rapa.ops.torch_path`) and the native kernels (:mod:`rapa.ops.native`) use
:data:`scratch`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import Tensor

MEMO_SIZE = 64
"""Shape-dependent index tables kept per thread (the most recently used)."""


class Workspace(threading.local):
    """Scratch buffers and memoised index tables, one set per thread."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], Tensor] = {}
        self.tables: dict[tuple, Any] = {}

    def get(self, role: str, numel: int, like: Tensor) -> Tensor:
        """A flat scratch tensor of ``numel`` elements of ``like``'s dtype (fresh off the CPU)."""
        if like.device.type != "cpu":
            return like.new_empty(numel)
        key = (role, like.dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[key] = like.new_empty(numel)
        return buf[:numel]

    def arange(self, n: int, device: torch.device) -> Tensor:
        """``torch.arange(n)`` (int64), read-only: cached on the CPU."""
        if device.type != "cpu":
            return torch.arange(n, device=device)
        key = ("arange", torch.int64)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.arange(max(n, 1024))
        return buf[:n]

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, kept for the next call with the same ``key`` (index tables that depend
        on shapes only; read-only). The last :data:`MEMO_SIZE` keys are kept."""
        value = self.tables.pop(key, None)
        if value is None:
            value = make()
            while len(self.tables) >= MEMO_SIZE:
                self.tables.pop(next(iter(self.tables)))
        self.tables[key] = value  # most recent last
        return value

    def clear(self) -> None:
        """Free this thread's buffers and tables."""
        self.bufs.clear()
        self.tables.clear()


scratch = Workspace()
"""The workspace of the calling thread (a ``threading.local``)."""
