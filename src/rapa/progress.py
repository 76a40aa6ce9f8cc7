"""Progress bars for the long steps (evaluation, voting, attacks, reductions), off by default.

Library calls stay silent; a command turns the bars on for its duration with
:func:`shown` (``rapa eval``, ``attack``, ``reduce`` and ``train`` do unless ``--quiet``),
and the loops wrap their batches in :func:`track`. Bars go to stderr, only on a terminal
(tqdm's ``disable=None``), and vanish when done, so stdout keeps only the results.

>>> with shown():
...     for x, y in track(loader, "evaluating"):
...         ...
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Iterable, Iterator, TypeVar

__all__ = ["enabled", "shown", "track"]

T = TypeVar("T")
_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("rapa_progress", default=False)


def enabled() -> bool:
    """Whether progress bars are on in this context."""
    return _ON.get()


@contextlib.contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Turn progress bars on (or off) inside the ``with`` block."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch") -> Iterable[T]:
    """``items`` unchanged, shown as a bar on stderr when bars are on (:func:`shown`)."""
    if not _ON.get():
        return items
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, disable=None, file=sys.stderr,
                dynamic_ncols=True)
