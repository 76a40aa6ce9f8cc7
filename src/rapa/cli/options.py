"""What every computing command shares: ``--threads``, ``--quiet`` and its outputs checked first.

* :func:`add_threads` / :func:`apply_threads`: ``--threads N``; the default ``auto``
  (:func:`auto_threads`) takes the CPUs that are not busy, so a loaded machine is not
  oversubscribed (on a busy 2-core machine torch's own default trained 9x slower than one
  thread).
* :func:`add_quiet`: ``--quiet``; without it, steps longer than a few seconds show a
  progress bar on stderr (:mod:`rapa.progress`).
* :func:`output_folder` / :func:`output_file`: an output is checked (created, written to
  and removed again) *before* anything is computed, so a typo in ``--out`` costs nothing;
  :func:`write_text` turns a write that fails later (a full disk) into one
  :class:`~rapa.errors.OutputError` line, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rapa.errors import OutputError, RapaError

__all__ = ["add_quiet", "add_threads", "apply_threads", "auto_threads", "output_file", "output_folder",
           "run_output", "write_text"]


def add_threads(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """Add ``--threads`` (``auto``, 0 = torch's default, or a count)."""
    p.add_argument("--threads", type=_threads, default=default, metavar="N",
                   help="CPU threads: auto (the CPUs not busy with other work, at least 1), 0 (torch's "
                        f"default: every core) or a number (default {default})")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """Add ``--quiet``: no progress bars."""
    p.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr, on a terminal)")


def _threads(text: str) -> str | int:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a number of threads, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a positive number of threads, got {text!r}")
    return value


def auto_threads() -> int:
    """CPUs this process may use minus the recent load of the machine (1-minute average),
    rounded, at least 1 and at most torch's default."""
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(torch.get_num_threads(), cpus, int(cpus - load + 0.5)))


def apply_threads(threads: str | int | None) -> int:
    """Set torch's CPU threads for this command (``auto``, 0/None: torch's default, N);
    returns the number in use."""
    import torch

    if threads == "auto":
        threads = auto_threads()
    if isinstance(threads, int) and not isinstance(threads, bool):
        if threads < 0:
            raise RapaError(f"--threads must be auto or >= 0, got {threads}")
        if threads > 0:
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create folder ``path`` and check that a file can be written in it; RapaError naming
    ``option`` if not. Call it before computing anything."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rapa-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RapaError(f"{option} {folder}: cannot write there ({exc.strerror or exc}); "
                        f"choose a writable folder") from None
    return folder


def run_output(run_dir: str | os.PathLike, out: str | os.PathLike | None) -> Path:
    """For the commands that read a run and write next to it: RapaError unless ``run_dir``
    holds a run (checked first, so that a mistyped DIR is not created), then
    :func:`output_folder` of ``out`` (default: the run directory)."""
    from rapa.train import read_config

    read_config(run_dir)
    return output_folder(out if out is not None else run_dir)


def output_file(path: str | os.PathLike, option: str) -> Path:
    """Check that file ``path`` can be written (its folder exists and is writable; an
    existing file is kept as it is); RapaError naming ``option`` if not."""
    path = Path(path)
    if path.is_dir():
        raise RapaError(f"{option} {path} is a folder; give a file name")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise RapaError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                        f"choose a writable file") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a result file; OutputError (one line, exit status 1) if the write fails."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
