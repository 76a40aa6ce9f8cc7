"""The aihwkit dependency: the check that it is installed, and seeding.

What :func:`manual_seed` makes repeatable, and what not (aihwkit 1.2.0, CPU tiles):

* repeatable: the tile assignments, the initial weights and everything else drawn from
  torch's generator, and the device-to-device variations of every array (its
  ``construction_seed``; :func:`rapa.analog.convert_to_analog` draws one per array from
  torch's generator, so it follows ``manual_seed``);
* not repeatable: cycle-to-cycle update noise, stochastic pulse trains and the output
  noise of the C++ simulator (``RPUSimple``'s generator is seeded from the clock, and
  aihwkit exposes no binding to seed it). Two ``rpu-baseline`` runs from the same seed
  therefore differ; ``ideal`` runs do not (they draw no simulator random numbers).

Threads: aihwkit's compiled simulator calls OpenBLAS, whose thread pool is sized when the
library loads (every core, by default) and ignores ``torch.set_num_threads``. Its second
thread burns 70-80% more CPU for an analog training step with no gain in speed for the RAPA
net, so "one thread" runs used about two cores each. :func:`require_aihwkit` therefore loads
the simulator with as many BLAS threads as torch uses at that moment (``OPENBLAS_NUM_THREADS``
set by the user wins); :func:`simulator_threads` changes the number later.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from rapa.errors import RapaError

INSTALL_HINT = 'analog training needs aihwkit: pip install "rapa[analog]"'


SIMULATOR = "aihwkit.simulator.rpu_base"
"""aihwkit's compiled simulator (the module that loads OpenBLAS)."""


def require_aihwkit() -> ModuleType:
    """Import and return :mod:`aihwkit` with its compiled simulator, the simulator's BLAS
    sized to torch's thread count (see the module docstring); :class:`RapaError` with the
    install line if missing."""
    try:
        if SIMULATOR not in sys.modules:
            user_set = "OPENBLAS_NUM_THREADS" in os.environ
            if not user_set:  # read once, when OpenBLAS loads; not left for other libraries or subprocesses
                os.environ["OPENBLAS_NUM_THREADS"] = str(torch.get_num_threads())
            try:
                importlib.import_module(SIMULATOR)
            finally:
                if not user_set:
                    os.environ.pop("OPENBLAS_NUM_THREADS", None)
        return importlib.import_module("aihwkit")
    except ImportError as exc:  # not installed, or its compiled simulator failed to load
        raise RapaError(INSTALL_HINT) from exc


def simulator_threads(threads: int) -> None:
    """Use ``threads`` BLAS threads in aihwkit's simulator from now on (through threadpoolctl;
    it sets every BLAS library loaded in this process, numpy's too)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be a positive integer")
    require_aihwkit()
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def aihwkit_available() -> bool:
    """Whether aihwkit can be imported."""
    try:
        require_aihwkit()
    except RapaError:
        return False
    return True


def manual_seed(seed: int) -> None:
    """Seed what can be seeded of an analog run: torch's generators (assignments, init,
    the per-array construction seeds drawn at conversion). See the module docstring for
    the simulator noise that aihwkit does not let us seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    torch.manual_seed(seed)


def check_device(device: torch.device | str) -> None:
    """:class:`RapaError` if ``device`` is CUDA and this aihwkit was built without CUDA (its
    arrays are then simulated on the CPU only)."""
    if torch.device(device).type != "cuda":
        return
    require_aihwkit()
    from aihwkit.simulator.rpu_base import cuda

    if not cuda.is_compiled():
        raise RapaError(f"device {str(device)!r}: this aihwkit was built without CUDA, so its analog arrays "
                        "run on the CPU only; use --device cpu (or install aihwkit built with CUDA)")


def draw_construction_seed(generator: torch.Generator | None = None) -> int:
    """A non-zero device construction seed drawn from ``generator`` (torch's if ``None``)."""
    return int(torch.randint(1, 2**31 - 1, (), generator=generator))
