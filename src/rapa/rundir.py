"""The run directory: its files, what a resume must match, atomic writes, checked reads.

A run directory (``rapa train --out DIR``) holds what training writes (:data:`TRAIN_FILES`)

* ``config.json``: the resolved :class:`~rapa.config.TrainConfig` plus the torch and rapa
  versions (:func:`write_config`; read back, and validated, by :func:`read_config`);
* ``metrics.csv``: one row per epoch, columns :data:`METRIC_FIELDS` (:func:`write_metrics`,
  :func:`append_metrics`, :func:`read_metrics`);
* ``checkpoint.pt``: model, optimizer, epoch, RNG states, history (:mod:`rapa.checkpoint`);
* ``summary.json``: written once the run has finished (:func:`write_summary`, :func:`read_summary`);
* ``arrays.json`` (analog runs only): after each epoch, what the analog arrays did in it
  (:func:`rapa.analog.diagnostics.epoch_record`: weights at a device bound, output scales,
  pulsed updates cut short by the pulse train's length), one record per epoch;

and the results the analyses add next to them (:data:`RESULT_FILES`, written by
:func:`write_result` for :mod:`rapa.analysis`, read by :func:`read_result`): ``reduce.json``
(``rapa reduce``), ``attack.json`` and ``attack.png`` (``rapa attack``), ``similarity.json``
and ``filters.png`` (``rapa similarity``), ``voting.json`` (the sweeps' per-image voting
comparison). A sweep adds ``sweep-errors.log`` (:data:`ERRORS_LOG`) to a run that failed.
:data:`SMALL_FILES` are those a results tree keeps (everything but the checkpoint and the
plots; :func:`export_small_files`).

Resume (:func:`prepare`): a resumed run must match its saved config in every field except
:data:`RESUMABLE_FIELDS`, which do not change the weights trained so far (the epochs to
train up to, where and how it is evaluated, where the data lie; also left out of a sweep's
run-name hash) and :data:`RESUME_OVERRIDES` (``lr``: a lower rate after a non-finite loss,
which changes the run from there on). ``rapa train --resume`` accepts exactly the options
of these fields.

Every file is written atomically (:func:`atomic_write`: a temporary file in the same
folder, fsync, rename), so a run killed at any moment leaves the old file or the new one,
never a torn one; every read that a user's file can break raises a one-line
:class:`~rapa.errors.RapaError`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

from rapa.config import TrainConfig
from rapa.errors import OutputError, RapaError

__all__ = ["ARRAYS_FILE", "CHECKPOINT_FILE", "CONFIG_FILE", "ERRORS_LOG", "METRICS_FILE", "METRIC_FIELDS", "RESULT_FILES",
           "RESULT_PLOTS", "RESUMABLE_FIELDS", "RESUME_OVERRIDES", "SMALL_FILES", "SUMMARY_FILE", "TRAIN_FILES",
           "append_metrics", "atomic_write", "atomic_write_bytes", "atomic_write_text", "check_resume",
           "export_small_files", "file_keys", "holds_run", "is_finished", "json_safe", "metric_rows", "prepare",
           "read_config", "read_json", "read_keys", "read_metrics", "read_result", "read_summary", "result_path",
           "write_config", "write_metrics", "write_result", "write_summary"]

# ------------------------------------------------------------------------ the files

CONFIG_FILE = "config.json"
"""The resolved config and the torch / rapa versions that trained it."""
METRICS_FILE = "metrics.csv"
"""One row per epoch (:data:`METRIC_FIELDS`)."""
CHECKPOINT_FILE = "checkpoint.pt"
"""The last epoch's checkpoint (:mod:`rapa.checkpoint`)."""
SUMMARY_FILE = "summary.json"
"""The finished run's summary (errors as fractions)."""
ERRORS_LOG = "sweep-errors.log"
"""The tracebacks of a sweep's failed attempts at this run."""
ARRAYS_FILE = "arrays.json"
"""Analog runs: one record per epoch of the arrays' state and their pulsed updates."""
TRAIN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, ARRAYS_FILE)
"""The files training writes (deleted by ``--overwrite``, carried back from a Ray node)."""
RESULT_FILES = {"reduction": "reduce.json", "robustness": "attack.json", "similarity": "similarity.json",
                "voting": "voting.json"}
"""The result file of each analysis (:mod:`rapa.analysis`), by the analysis' name."""
RESULT_PLOTS = {"robustness": "attack.png", "similarity": "filters.png"}
"""The figure some analyses draw next to their result file."""
SMALL_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ARRAYS_FILE, RESULT_FILES["voting"], RESULT_FILES["similarity"],
               RESULT_FILES["reduction"], RESULT_FILES["robustness"])
"""The files a results tree keeps of a run (everything but the checkpoint and the plots)."""
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_error", "test_error", "seconds")
"""Columns of metrics.csv (errors are fractions; test_error is empty where not measured)."""

RESUMABLE_FIELDS = ("epochs", "device", "data_dir", "download", "votes", "adaptive_threshold",
                    "eval_batch_size", "eval_every")
"""Config fields a resumed run may change: they do not change the weights of an epoch."""
RESUME_OVERRIDES = ("lr",)
"""Config fields a resumed run may change that change the run from there on (a lower rate
after a non-finite loss)."""


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a run directory (it has a config.json)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def result_path(folder: str | os.PathLike, analysis: str) -> Path:
    """Where ``analysis`` (a key of :data:`RESULT_FILES`) keeps its result in ``folder``."""
    return Path(folder) / RESULT_FILES[analysis]


# -------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder (created), fsync it, rename it
    to ``path``: readers see the old file or the new one, never a torn one."""
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------- config, summary


def write_config(run_dir: str | os.PathLike, config: TrainConfig, meta: Mapping[str, Any]) -> None:
    """``config.json``: the config's fields and ``meta`` (the versions that trained it)."""
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps({**config.to_dict(), **meta}, indent=2) + "\n")


def read_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The config saved in ``run_dir/config.json``, validated; RapaError if there is no run
    or its config is unreadable or invalid (one check for every reader: train --resume,
    eval, similarity, reduce, attack, report)."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RapaError(f"no run directory {run_dir}")
    if not path.is_file():
        raise RapaError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RapaError(f"{path} is unreadable: {exc}") from None
    config = TrainConfig.from_dict(data)
    try:
        config.validate(check_device=False)  # a run trained on a GPU is still read on a CPU
    except RapaError as exc:
        raise RapaError(f"{path}: {exc}") from None
    except TypeError as exc:  # a value of a type no check expected (e.g. a list where a number goes)
        raise RapaError(f"{path}: invalid value ({exc})") from None
    return config


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """``summary.json`` of a finished run."""
    atomic_write_text(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: str | os.PathLike, strict: bool = False) -> dict[str, Any] | None:
    """``summary.json`` (None while the run is unfinished). An unreadable file is None too,
    or with ``strict`` a RapaError naming it."""
    path = Path(run_dir) / SUMMARY_FILE
    if not strict or not path.is_file():
        return read_json(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RapaError(f"{path} is unreadable: {exc}") from None
    if not isinstance(value, dict):
        raise RapaError(f"{path} is not a run's summary (a JSON object)")
    return value


def is_finished(run_dir: str | os.PathLike, epochs: int) -> bool:
    """Whether ``run_dir`` holds a finished run of at least ``epochs`` epochs (summary.json)."""
    summary = read_summary(run_dir)
    try:
        return summary is not None and int(summary.get("epochs") or 0) >= epochs
    except (ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- metrics


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in METRIC_FIELDS}


def write_metrics(run_dir: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.csv`` with the header and one row per epoch of ``history`` (NaN: empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow(_csv_row(row))
    atomic_write_text(Path(run_dir) / METRICS_FILE, buf.getvalue())


def append_metrics(run_dir: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one epoch's row to ``metrics.csv``."""
    with open(Path(run_dir) / METRICS_FILE, "a", newline="") as f:
        csv.DictWriter(f, METRIC_FIELDS, lineterminator="\n").writerow(_csv_row(row))


def metric_rows(run_dir: str | os.PathLike) -> int:
    """Data rows of ``metrics.csv`` (0 when it is missing)."""
    try:
        with open(Path(run_dir) / METRICS_FILE) as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except OSError:
        return 0


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of ``metrics.csv`` as floats (NaN where empty, e.g. a test error not measured);
    RapaError if it is missing or malformed."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RapaError(f"{run_dir} has no {METRICS_FILE}")
    try:
        with open(path, newline="") as f:
            return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as exc:
        raise RapaError(f"{path} is malformed: {exc}") from None


# ---------------------------------------------------------------------------- resume


def check_resume(run_dir: str | os.PathLike, saved: TrainConfig, config: TrainConfig) -> None:
    """RapaError unless ``config`` matches the ``saved`` config of ``run_dir`` in every field
    but :data:`RESUMABLE_FIELDS` and :data:`RESUME_OVERRIDES`."""
    free = RESUMABLE_FIELDS + RESUME_OVERRIDES
    old = saved.to_dict()
    changed = [f for f, v in config.to_dict().items() if f not in free and old.get(f) != v]
    if changed:
        raise RapaError(f"cannot resume {run_dir} with a different config: {', '.join(changed)} differ "
                        f"(only {', '.join(free)} may change)")


def prepare(out: str | os.PathLike, config: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check run directory ``out`` before training ``config`` into it; returns the checkpoint
    to resume from (None: start afresh).

    Without ``resume``: RapaError if ``out`` holds a run, unless ``overwrite`` (then the old
    run's :data:`TRAIN_FILES` are deleted). With ``resume``: RapaError if there is no run, if
    the config differs (:func:`check_resume`), or if it holds results but no checkpoint; a
    run killed before its first checkpoint starts again.
    """
    out = Path(out)
    if not resume:
        if ((out / CONFIG_FILE).exists() or (out / CHECKPOINT_FILE).exists()) and not overwrite:
            raise RapaError(f"{out} already holds a run; resume it (--resume) or choose another --out")
        for name in TRAIN_FILES:
            (out / name).unlink(missing_ok=True)
        return None
    if not holds_run(out):
        raise RapaError(f"nothing to resume in {out}: no {CONFIG_FILE}")
    check_resume(out, read_config(out), config)
    if not (out / CHECKPOINT_FILE).is_file():
        if (out / SUMMARY_FILE).is_file() or metric_rows(out):
            raise RapaError(f"cannot resume {out}: it holds results but no {CHECKPOINT_FILE}; start it again "
                            f"with --overwrite (or train into another --out)")
        return None  # killed before the first epoch ended: start again
    return out / CHECKPOINT_FILE


# ------------------------------------------------------------------------ the results


def file_keys(record: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """``record`` with its keys renamed as a result file spells them (``names``: key -> file key,
    e.g. ``tiled_error`` -> ``tiled_error_percent``: the unit in the key); other keys kept."""
    return {names.get(k, k): v for k, v in record.items()}


def read_keys(record: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The inverse of :func:`file_keys`: a result file's record with rapa's own keys; a file
    written before the units were in the keys (``tiled_error`` itself, the same percentages)
    reads the same."""
    back = {v: k for k, v in names.items()}
    out = {k: v for k, v in record.items() if k not in back}
    for k, v in record.items():
        if k in back:
            out[back[k]] = v  # the new spelling wins over an old one
    return out


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_result(folder: str | os.PathLike, analysis: str, record: Mapping[str, Any],
                 names: Mapping[str, str] | None = None) -> Path:
    """Write ``analysis``' result file (:data:`RESULT_FILES`) in ``folder``: ``record`` with
    its keys renamed by ``names`` (:func:`file_keys`), NaN as null; returns its path.
    :class:`~rapa.errors.OutputError` (one line, exit status 1) if the write fails."""
    path = result_path(folder, analysis)
    text = json.dumps(json_safe(file_keys(record, names or {})), indent=1) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def read_result(run_dir: str | os.PathLike, analysis: str, names: Mapping[str, str] | None = None,
                fresh: bool = False) -> dict[str, Any] | None:
    """``analysis``' result in ``run_dir`` with rapa's own keys (:func:`read_keys` of
    ``names``); None if missing or unreadable, and with ``fresh`` also if it is older than
    the run's checkpoint (a run trained on since)."""
    path = result_path(run_dir, analysis)
    ckpt = Path(run_dir) / CHECKPOINT_FILE
    if fresh and path.is_file() and ckpt.is_file() and path.stat().st_mtime < ckpt.stat().st_mtime:
        return None
    value = read_json(path)
    return value if value is None or not names else read_keys(value, names)


def export_small_files(run_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the run's :data:`SMALL_FILES` into ``dest`` (atomically; unchanged files are
    left); returns the names copied."""
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SMALL_FILES:
        src = run_dir / name
        if not src.is_file():
            continue
        target = dest / name
        data = src.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        atomic_write_bytes(target, data)
        copied.append(name)
    return copied
