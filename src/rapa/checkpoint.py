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

__all__ = ["atomic_write_text", "load_checkpoint", "save_checkpoint"]


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`RapaError` when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise RapaError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a torn or foreign file
        raise RapaError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise RapaError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    _atomic_write(path, lambda f: f.write(text.encode()))
