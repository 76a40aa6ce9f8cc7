"""Atomic checkpoints: written to a temporary file, then renamed over the old one
(:func:`rapa.rundir.atomic_write`).

A run killed at any moment leaves either the previous checkpoint or the new one, never a
torn file. Checkpoints hold only tensors and plain Python types (RNG states included), so
they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rapa.errors import RapaError
from rapa.rundir import atomic_write

__all__ = ["CHECKPOINT_KEYS", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_KEYS: tuple[str, ...] = ("format", "epoch", "model")
"""Entries every checkpoint of a run has (and that tell it from another program's file)."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`RapaError` when the file is missing, empty, torn or not a rapa
    checkpoint (never passing on torch's advice to load it with ``weights_only=False``,
    which would run whatever code a foreign file holds).
    """
    path = Path(path)
    if not path.is_file():
        raise RapaError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise RapaError(f"checkpoint {path} is empty: not a rapa checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a torn or foreign file
        raise RapaError(f"{path} is not a rapa checkpoint (torch cannot read it as one: "
                        f"{type(exc).__name__}); it is torn or another program's file") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RapaError(f"{path} is not a rapa checkpoint (it lacks {', '.join(missing)})")
    return state

