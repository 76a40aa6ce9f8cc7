"""Atomic checkpoints: written to a temporary file, then renamed over the old one.

A run killed at any moment leaves either the previous checkpoint or the new one, never a
torn file. Checkpoints hold only tensors and plain Python types (RNG states included), so
they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch

from rapa.errors import RapaError

__all__ = ["CHECKPOINT_KEYS", "atomic_write_text", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_KEYS: tuple[str, ...] = ("format", "epoch", "model")
"""Entries every checkpoint of a run has (and that tell it from another program's file)."""


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files are as readable as any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    _atomic_write(path, lambda f: torch.save(state, f))


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    _atomic_write(path, lambda f: f.write(text.encode()))
