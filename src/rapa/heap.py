"""glibc's heap kept by rapa's own processes (the ``rapa`` commands), never by the library.

glibc returns the free memory at the top of its heap to the kernel once more than its trim
threshold is free, and serves blocks above its mmap threshold with fresh mappings that go
back to the kernel when freed. A training step frees and allocates activation-sized tensors
at every layer, so the next allocation often faults its pages in again: a ReLU and a max
pooling of a 1.3 MB tensor right after a tiled layer's forward took a median 374-409 us
instead of 95-108 us (README, Benchmarks). The ``rapa`` commands therefore raise both
thresholds for their own process with ``mallopt``; ``RAPA_KEEP_HEAP=0``, or any ``MALLOC_*``
setting of the user's, leaves glibc's defaults. Importing :mod:`rapa` changes nothing. The
Ray tasks of a sweep started by a ``rapa`` command (``rapa sweep``, ``rapa reproduce``) keep
the heap of their worker process too (:func:`rapa.sweep.runner.run_sweep`'s ``keep_heap``).
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_SWITCH = "RAPA_KEEP_HEAP"  # "0": leave glibc's defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
TRIM_BYTES = 1 << 30  # free memory kept at the heap's top before any goes back to the kernel
MMAP_BYTES = 32 << 20  # blocks below this come from the heap (glibc's largest allowed value)
_state = {"kept": False}  # whether keep_heap() changed this process's settings


def keep_heap() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; ``False`` (nothing changed)
    where the C library is not glibc, ``RAPA_KEEP_HEAP=0``, or the user set ``MALLOC_*``."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    _state["kept"] = _state["kept"] or done
    return done


def kept() -> bool:
    """Whether :func:`keep_heap` has raised the thresholds of this process."""
    return _state["kept"]
