"""Running a sweep on Ray: one task per run, retries from the last checkpoint, finished runs skipped.

>>> from rapa.sweep import load_experiment, run_sweep
>>> result = run_sweep(load_experiment("quick").runs, "runs/quick", experiment="quick")

Every run is a Ray task (``num_cpus``/``num_gpus`` per run) that calls
``rapa.train.train(config, DIR/NAME, resume=...)``: a fresh run starts, an interrupted one
continues from its last epoch checkpoint. A task that raises or whose worker dies is
submitted again (resuming) up to ``max_retries`` times; a :class:`RapaError` (a config
or data problem that would fail again) is not retried. A run that still fails is
recorded with its error and the sweep goes on. Runs whose ``summary.json`` covers the
asked epochs are skipped, so the same call after an interruption resumes the rest.

Without an address Ray starts on this machine and stops at the end; with one (``HOST:PORT``
of a running cluster's head, ``ray://HOST:PORT`` or ``auto``) the runs go to that cluster.
Every node needs rapa installed; the sweep folder should be on a file system all nodes
see (a run retried on another node then resumes; without one the finished runs' files
are copied back to this machine, and a retry starts afresh). The state of the sweep is
kept in ``DIR/sweep-EXPERIMENT.json``.
"""

from __future__ import annotations

import json
import math
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rapa import rundir
from rapa.config import TrainConfig
from rapa.errors import RapaError
from rapa.heap import keep_heap, kept
from rapa.rundir import is_finished  # re-exported: rapa.sweep's API
from rapa.sweep.cluster import check_address, connect  # re-exported: connect is used by rapa.sweep.reproduce
from rapa.sweep.experiments import RunSpec
from rapa.train import train

__all__ = ["RunOutcome", "SweepResult", "check_address", "connect", "is_finished", "run_sweep", "sweep_state_path"]



@dataclass
class RunOutcome:
    """What happened to one run of a sweep."""

    name: str
    """The run's name (its folder in the sweep directory)."""
    status: str = "pending"
    """pending, running, done (trained now), skipped (finished before) or failed."""
    attempts: int = 0
    """Tasks started for it in this sweep."""
    error: str | None = None
    """The last error (type and message) when it failed or was retried."""
    seconds: float | None = None
    """Seconds from the submission of its last task to its end (queueing included)."""
    summary: dict[str, Any] | None = None
    """Its summary.json once finished."""


@dataclass
class SweepResult:
    """The outcome of :func:`run_sweep`."""

    out: Path
    """The sweep folder."""
    runs: dict[str, RunOutcome] = field(default_factory=dict)
    """Outcome per run name."""

    def count(self, *statuses: str) -> int:
        """Number of runs with one of ``statuses``."""
        return sum(r.status in statuses for r in self.runs.values())

    @property
    def failed(self) -> list[RunOutcome]:
        """The runs that failed."""
        return [r for r in self.runs.values() if r.status == "failed"]


# ------------------------------------------------------------------------- helpers


def sweep_state_path(out: str | Path, experiment: str) -> Path:
    """Where the state of sweep ``experiment`` is kept: ``OUT/sweep-EXPERIMENT.json``."""
    return Path(out) / f"sweep-{experiment}.json"


def _execute(train_fn: Callable[..., dict], config: dict[str, Any], run_dir: str, cpus: float,
             driver_node: str | None, heap: bool = False) -> dict[str, Any]:
    """Body of a Ray task: train (or resume) one run; returns its summary, and its files
    when running on another node than the driver. ``heap``: keep the worker's glibc heap
    (:mod:`rapa.heap`) first."""
    import ray

    if heap:
        keep_heap()
    torch.set_num_threads(max(1, int(cpus)))
    path = Path(run_dir)
    resume = rundir.holds_run(path)
    summary = train_fn(TrainConfig.from_dict(config), path, resume=resume, progress=False)
    node = ray.get_runtime_context().get_node_id()
    files = None
    if driver_node is not None and node != driver_node:
        files = {name: (path / name).read_bytes() for name in rundir.TRAIN_FILES if (path / name).is_file()}
    return {"summary": summary, "files": files, "node": node, "host": socket.gethostname()}


def _error_text(exc: BaseException) -> tuple[str, BaseException, str]:
    """(one-line message, original exception, full text) of a task error."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    line = f"{type(cause).__name__}: {text[-1] if text else ''}".strip()
    return line, cause, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + "\n" + str(exc)


def _write_back(run_dir: Path, files: dict[str, bytes] | None) -> None:
    """Files of a run finished on another node, written where this machine has none."""
    if not files:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = run_dir / name
        if not target.exists():
            rundir.atomic_write_bytes(target, data)


class _State:
    """The sweep's JSON state file, rewritten atomically on every change."""

    def __init__(self, path: Path, experiment: str, runs: Sequence[RunSpec], info: dict[str, Any]) -> None:
        self.path = path
        self.doc = {"experiment": experiment, **info, "runs": {
            r.name: {"config": r.config.to_dict(), "status": "pending", "attempts": 0, "error": None}
            for r in runs}}

    def update(self, outcome: RunOutcome) -> None:
        entry = self.doc["runs"][outcome.name]
        entry.update(status=outcome.status, attempts=outcome.attempts, error=outcome.error,
                     seconds=outcome.seconds)
        self.save()

    def save(self) -> None:
        self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        rundir.atomic_write_text(self.path, json.dumps(self.doc, indent=1) + "\n")


# --------------------------------------------------------------------------- Ray


def _slots(cpus: float, gpus: float) -> int:
    """How many runs the cluster can hold at once with these resources per run."""
    import ray

    total = ray.cluster_resources()
    n = math.floor(total.get("CPU", 0) / cpus) if cpus > 0 else 10**6
    if gpus > 0:
        n = min(n, math.floor(total.get("GPU", 0) / gpus + 1e-9))
    return max(n, 0)


def run_sweep(runs: Sequence[RunSpec], out: str | Path, experiment: str = "sweep", address: str | None = None,
              cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_retries: int = 2,
              num_cpus: int | None = None, train_fn: Callable[..., dict] | None = None,
              log: Callable[[str], None] | None = None, info: dict[str, Any] | None = None,
              keep_heap: bool | None = None) -> SweepResult:
    """Train ``runs`` into ``out/NAME`` as Ray tasks; returns what happened to each.

    Args:
        runs: the runs (names must be unique).
        out: the sweep folder.
        experiment: name of the sweep (its state file is ``out/sweep-EXPERIMENT.json``).
        address: a running Ray cluster (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``); None:
            use the Ray already initialised in this process, else start one here.
        cpus_per_trial, gpus_per_trial: Ray resources of each run (fractions of a GPU pack
            several runs onto one; with 0 GPUs a run trains on the CPU).
        max_retries: how often a crashed run is resumed before it counts as failed.
        num_cpus: CPUs of a Ray started here (default: all of this machine's).
        train_fn: the training function (default :func:`rapa.train.train`); must be
            picklable, take ``(config, run_dir, resume=, progress=)`` and return the summary.
        log: called with one line per change (default: print to stdout).
        info: extra entries for the state file (description, budget).
        keep_heap: whether each task keeps its worker's glibc heap (:mod:`rapa.heap`: about
            10% faster training steps; the worker process keeps the setting for its later
            tasks); None: as this process does (the ``rapa`` commands do, a library caller
            by default not).

    Raises:
        RapaError: the address cannot be reached, Ray is not installed, the cluster lacks
            the resources of a run, or two runs share a name.
    """
    if train_fn is None:
        train_fn = train
    say = log if log is not None else (lambda msg: print(msg, flush=True))
    for key, value, low in (("cpus_per_trial", cpus_per_trial, 0), ("gpus_per_trial", gpus_per_trial, 0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low or math.isnan(value):
            raise RapaError(f"--{key.replace('_', '-')} must be >= {low}, got {value!r}")
    if cpus_per_trial == 0 and gpus_per_trial == 0:
        raise RapaError("--cpus-per-trial and --gpus-per-trial are both 0: a run needs some resource")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise RapaError(f"--max-retries must be an integer >= 0, got {max_retries!r}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise RapaError("two runs of the sweep share a name")
    out = Path(out)
    result = SweepResult(out=out, runs={r.name: RunOutcome(r.name) for r in runs})
    todo: list[RunSpec] = []
    for r in runs:
        if is_finished(out / r.name, r.config.epochs):
            result.runs[r.name].status = "skipped"
        else:
            todo.append(r)

    if not todo:  # nothing to train: no Ray needed (an address is still checked)
        if address is not None:
            check_address(address)
        say(f"sweep {experiment}: all {len(runs)} runs finished before, nothing to do ({out})")
        return result
    started = connect(address, num_cpus)
    import ray

    try:
        total = ray.cluster_resources()
        if total.get("CPU", 0) < cpus_per_trial:
            raise RapaError(f"a run asks for {cpus_per_trial:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}")
        if gpus_per_trial > 0 and total.get("GPU", 0) < gpus_per_trial:
            raise RapaError(f"a run asks for {gpus_per_trial:g} GPUs but the Ray cluster has {total.get('GPU', 0):g}")
        out.mkdir(parents=True, exist_ok=True)
        state = _State(sweep_state_path(out, experiment), experiment, runs,
                       {**(info or {}), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "address": address, "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial})
        for outcome in result.runs.values():
            if outcome.status == "skipped":
                state.doc["runs"][outcome.name]["status"] = "skipped"
        state.save()
        where = address or "this machine"
        say(f"sweep {experiment}: {len(runs)} runs ({len(runs) - len(todo)} finished before, skipped), "
            f"Ray on {where} ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs), "
            f"{cpus_per_trial:g} CPU / {gpus_per_trial:g} GPU per run, into {out}")
        if total.get("GPU", 0) > 0 and gpus_per_trial == 0:
            say(f"sweep {experiment}: note: the cluster has {total.get('GPU', 0):g} GPUs but runs ask for none "
                f"(--gpus-per-trial 0.25 puts four runs on each GPU)")
        heap = kept() if keep_heap is None else bool(keep_heap)
        _drive(todo, out, result, state, train_fn, cpus_per_trial, gpus_per_trial, max_retries, say, experiment,
               heap)
    finally:
        if started:
            ray.shutdown()
    say(f"sweep {experiment}: finished: {result.count('done')} trained, {result.count('skipped')} skipped, "
        f"{result.count('failed')} failed")
    return result


def _drive(todo: Sequence[RunSpec], out: Path, result: SweepResult, state: _State, train_fn: Callable[..., dict],
           cpus: float, gpus: float, max_retries: int, say: Callable[[str], None], experiment: str,
           heap: bool = False) -> None:
    """Submit every run, collect results, resubmit crashed ones; keeps ``result`` and ``state`` current."""
    import ray

    remote = ray.remote(_execute).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    driver_node = ray.get_runtime_context().get_node_id()
    fn_ref = ray.put(train_fn)
    pending: dict[Any, tuple[RunSpec, float]] = {}

    def submit(spec: RunSpec) -> None:
        outcome = result.runs[spec.name]
        outcome.attempts += 1
        outcome.status = "running"
        ref = remote.remote(fn_ref, spec.config.to_dict(), str(out / spec.name), cpus, driver_node, heap)
        pending[ref] = (spec, time.perf_counter())
        state.update(outcome)

    def progress(event: str) -> None:
        done = result.count("done", "skipped")
        running = min(len(pending), _slots(cpus, gpus))
        say(f"[{done}/{len(result.runs)} done, {running} running, {result.count('failed')} failed] {event}")

    for spec in todo:
        submit(spec)
    progress(f"submitted {len(todo)} runs")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec, t0 = pending.pop(ref)
                outcome = result.runs[spec.name]
                outcome.seconds = round(time.perf_counter() - t0, 3)
                try:
                    value = ray.get(ref)
                except Exception as exc:  # RayTaskError (raised in train), WorkerCrashedError, NodeDiedError ...
                    line, cause, full = _error_text(exc)
                    outcome.error = line
                    _log_error(out / spec.name, outcome.attempts, full)
                    if not isinstance(cause, RapaError) and outcome.attempts <= max_retries:
                        submit(spec)
                        progress(f"retry {spec.name} (attempt {outcome.attempts}/{max_retries + 1}) after {line}")
                    else:
                        outcome.status = "failed"
                        state.update(outcome)
                        progress(f"FAILED {spec.name}: {line}")
                    continue
                _write_back(out / spec.name, value.get("files"))
                outcome.status, outcome.summary = "done", value.get("summary")
                state.update(outcome)
                progress(f"done {spec.name} ({_brief(outcome.summary)})")
    except BaseException:  # KeyboardInterrupt: stop the tasks; their checkpoints stay for the next call
        for ref, (spec, _) in pending.items():
            ray.cancel(ref, force=True)
            outcome = result.runs[spec.name]
            outcome.status, outcome.error = "pending", "interrupted"
            state.update(outcome)
        raise


def _brief(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "no summary"
    err, wall = summary.get("best5_test_error"), summary.get("wall_seconds")
    return "test error " + ("-" if err is None else f"{100 * err:.2f}%") + ("" if wall is None else f", {wall:.0f} s")


def _log_error(run_dir: Path, attempt: int, text: str) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / rundir.ERRORS_LOG, "a") as f:
            f.write(f"--- attempt {attempt}, {time.strftime('%Y-%m-%dT%H:%M:%S')}\n{text}\n")
    except OSError:
        pass
