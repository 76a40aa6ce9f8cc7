"""What the commands share: threads, comma-separated lists, outputs checked first, a run loaded.

* Threads: :func:`add_threads` / :func:`apply_threads` (``--threads N``; the default
  ``auto``, :func:`auto_threads`, takes the CPUs that are not busy, so a loaded machine is
  not oversubscribed: on a busy 2-core machine torch's own default trained 9x slower than
  one thread) and :func:`add_quiet` (``--quiet``; without it, steps longer than a few
  seconds show a progress bar on stderr, :mod:`rapa.progress`).
* Lists: :func:`parse_list` is the one parser of comma-separated option values (integers,
  numbers or names; a length, a lower bound or a set of choices checked), with
  :func:`int_list`, :func:`float_list` and :func:`name_list` for the usual kinds. An error
  is one :class:`~rapa.errors.RapaError` line naming the option and the value (exit status
  2); :func:`list_type` gives the same parser as an argparse ``type=``; :func:`positive_int`
  checks a count.
* Outputs: :func:`output_folder` / :func:`output_file` check an output (created, written to
  and removed again) *before* anything is computed, so a typo in ``--out`` costs nothing;
  :func:`write_text` turns a write that fails later (a full disk) into one
  :class:`~rapa.errors.OutputError` line, exit status 1.
* Runs: :func:`read_config` reads a run's config (:func:`rapa.rundir.read_config`, validated),
  :func:`run_output` checks that a directory holds a run before anything is computed (the
  model itself is loaded by :func:`rapa.train.load_run`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from rapa import rundir
from rapa.config import TrainConfig
from rapa.errors import OutputError, RapaError

__all__ = ["add_quiet", "add_threads", "apply_threads", "auto_threads", "float_list", "int_list", "list_type",
           "name_list", "output_file", "output_folder", "parse_list", "positive_int", "read_config",
           "run_output", "threads_arg", "write_text"]

# ---------------------------------------------------------------------------------- threads


def add_threads(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """Add ``--threads`` (``auto``, 0 = torch's default, or a count)."""
    p.add_argument("--threads", type=threads_arg, default=default, metavar="N",
                   help="CPU threads: auto (the CPUs not busy with other work, at least 1), 0 (torch's "
                        f"default: every core) or a number (default {default})")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """Add ``--quiet``: no progress bars."""
    p.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr, on a terminal)")


def threads_arg(text: str) -> str | int:
    """``--threads``: ``"auto"`` or a count >= 0 (argparse ``type=``)."""
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


# ------------------------------------------------------------------------------------ lists

_KINDS: dict[type, str] = {int: "integers", float: "numbers", str: "names"}


def parse_list(text: str, kind: type = int, *, option: str = "", length: int | None = None,
               minimum: float | None = None, choices: Sequence[str] | None = None,
               unit: str = "") -> tuple[Any, ...]:
    """The comma-separated values of ``text`` as a tuple of ``kind`` (int, float or str).

    Blanks around the values and empty entries (``"1,2,"``) are ignored. Checked, in this
    order: every value is a ``kind``, the list is not empty, it has ``length`` values (if
    given), each is >= ``minimum`` (if given) and one of ``choices`` (if given). Otherwise
    RapaError, one line starting with ``option`` and the text and saying what to give
    (``unit``, e.g. ``"dB"``, is named with the kind).
    """
    if kind not in _KINDS:
        raise TypeError(f"parse_list: kind must be int, float or str, got {kind!r}")
    what = f"comma-separated {_KINDS[kind]}" + (f" ({unit})" if unit else "")
    where = f"{option} {text!r}" if option else repr(text)
    items = [t.strip() for t in str(text).split(",")]
    items = [t for t in items if t]
    try:
        values = tuple(kind(t) for t in items)
    except ValueError:
        raise RapaError(f"{where}: give {what}") from None
    if not values:
        raise RapaError(f"{where}: empty list; " + (f"choose among {', '.join(choices)}" if choices else f"give {what}"))
    if length is not None and len(values) != length:
        raise RapaError(f"{where}: give {length} {'names' if kind is str else 'numbers'}, got {len(values)}")
    if minimum is not None and any(v < minimum for v in values):
        raise RapaError(f"{where}: every number must be >= {minimum:g}")
    if choices is not None:
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise RapaError(f"{where}: unknown {', '.join(map(str, unknown))}; choose among {', '.join(choices)}")
    return values


def int_list(option: str, text: str, length: int | None = None, minimum: int | None = 1) -> tuple[int, ...]:
    """``"16,4,1"`` -> ``(16, 4, 1)``: integers >= ``minimum`` (default 1), ``length`` of them
    if given; RapaError naming ``option`` otherwise."""
    return parse_list(text, int, option=option, length=length, minimum=minimum)


def float_list(option: str, text: str, unit: str = "") -> tuple[float, ...]:
    """``"10,20.5"`` -> ``(10.0, 20.5)``; RapaError naming ``option`` otherwise."""
    return parse_list(text, float, option=option, unit=unit)


def name_list(option: str, text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """The comma-separated names of ``text``, each one of ``allowed``; else RapaError naming
    ``option``, the unknown names (or the empty list) and the choices."""
    return parse_list(text, str, option=option, choices=allowed)


def list_type(kind: type = int, **checks: Any) -> Callable[[str], tuple[Any, ...]]:
    """:func:`parse_list` as an argparse ``type=`` (``checks``: its keyword arguments): a bad
    value is argparse's error for the option (exit status 2)."""
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return parse_list(text, kind, **checks)
        except RapaError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def positive_int(option: str, value: int | None) -> int | None:
    """``value`` unchanged if None or an integer >= 1, else RapaError naming ``option``."""
    if value is not None and value < 1:
        raise RapaError(f"{option} must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------------- outputs


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


# ------------------------------------------------------------------------------------- runs


def read_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`~rapa.config.TrainConfig` of the run in ``run_dir`` (:func:`rapa.rundir.read_config`:
    validated); RapaError if ``run_dir`` holds no (readable) run."""
    return rundir.read_config(run_dir)


def run_output(run_dir: str | os.PathLike, out: str | os.PathLike | None) -> Path:
    """For the commands that read a run and write next to it: RapaError unless ``run_dir``
    holds a run (checked first, so that a mistyped DIR is not created), then
    :func:`output_folder` of ``out`` (default: the run directory)."""
    read_config(run_dir)
    return output_folder(out if out is not None else run_dir)
