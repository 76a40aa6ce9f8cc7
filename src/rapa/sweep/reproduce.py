"""``rapa reproduce``: a battery of runs on Ray, its analyses, and the paper's claims with verdicts.

The standard battery (``experiments/fmnist.yaml``) trains every tiling scheme of Table 1
with tiles (16,4,1) and the enlarged untiled net, with the same seeds, on the full
Fashion-MNIST with the paper's recipe shortened to the budget; ``--quick``
(``experiments/quick.yaml``) is a smaller one. Each run is a Ray task that trains (or
resumes) the net, then computes the analyses its scheme needs (voting, filter
similarity, reduction, FGSM / EOT-FGSM robustness: :func:`needed_analyses`) and copies
its small files (:data:`rapa.rundir.SMALL_FILES`, not the checkpoint) into the results tree
(``results/NAME/runs/RUN``) as soon as it ends, so that nothing measured is lost and the
tree can be committed while the battery runs. A killed battery continues where it
stopped when the same command is run again (finished runs are skipped, unfinished ones
resume from their last epoch, missing analyses are computed). While it runs it prints
the runs done out of the total and an estimate of the time left. At the end
:func:`rapa.sweep.battery_report.write_battery_report` writes ``REPORT.md`` and
``claims.json`` from the results tree alone (``rapa report RESULTS`` does the same later).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rapa import rundir
from rapa.errors import RapaError
from rapa.heap import keep_heap, kept
from rapa.rundir import SMALL_FILES, export_small_files as export_run
from rapa.sweep.analyses import Analyses
from rapa.sweep.battery_report import MANIFEST, read_manifest, write_battery_report
from rapa.sweep.evidence import claims_json, evaluate_claims
from rapa.sweep.experiments import apply_budget, load_experiment
from rapa.sweep.runner import connect, run_sweep, sweep_state_path
from rapa.sweep.runs import RunRecord, scheme_label
from rapa.train import train

__all__ = ["BATTERY_SNRS", "QUICK_EXPERIMENT", "SMALL_FILES", "STANDARD_EXPERIMENT", "BatteryTask", "claims_json",
           "commit_results", "evaluate_claims", "export_run", "finish_run", "needed_analyses", "reproduce",
           "source_commit"]

STANDARD_EXPERIMENT = "fmnist"
QUICK_EXPERIMENT = "quick"
BATTERY_SNRS = (10.0, 15.0, 20.0, 25.0, 30.0, 33.0, 35.0, 40.0, 45.0, 50.0)
"""SNRs (dB, pixel space) of the attacks: Figure 7's range with the paper's 33 dB point measured."""


def needed_analyses(config: Any) -> tuple[str, ...]:
    """The analyses the claims and the report need of a run with this config."""
    if config.analog is not None:
        return ()
    label = scheme_label(config)
    if label == "random":
        return ("voting", "similarity", "reduction", "robustness")
    if label in ("no tiling", "no tiling enlarged"):
        return ("robustness",)
    if config.scheme not in ("none", "perforated") and config.tiles is not None:
        return ("similarity", "reduction")
    return ()


def _record(run_dir: Path) -> RunRecord:
    summary = rundir.read_summary(run_dir)
    return RunRecord(run_dir.name, run_dir, rundir.read_config(run_dir), summary,
                     "finished" if summary else "unfinished")


def missing_analyses(run_dir: str | Path, options: dict[str, Any]) -> list[str]:
    """The needed analyses of a finished run that are not cached (for ``options``)."""
    rec = _record(Path(run_dir))
    if not rec.finished:
        return []
    cached = Analyses(compute=False, **options)
    return [k for k in needed_analyses(rec.config) if getattr(cached, k)(rec) is None]


def finish_run(run_dir: str | Path, results_runs: str | Path, options: dict[str, Any]) -> list[str]:
    """Compute the missing analyses of a finished run (cached in its directory) and export its
    small files to ``results_runs/NAME``; returns the analyses computed."""
    run_dir = Path(run_dir)
    todo = missing_analyses(run_dir, options)
    if todo:
        analyses = Analyses(**options)
        rec = _record(run_dir)
        for kind in todo:
            getattr(analyses, kind)(rec)
    export_run(run_dir, Path(results_runs) / run_dir.name)
    return todo


@dataclass
class BatteryTask:
    """The training function of a battery's Ray tasks: train (or resume) a run, then
    :func:`finish_run` it. Picklable (Ray ships it to the workers)."""

    results_runs: str
    """The results tree's ``runs/`` folder."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`rapa.sweep.analyses.Analyses`."""

    def __call__(self, config: Any, run_dir: str | Path, resume: bool = False, progress: bool = False) -> dict:
        summary = train(config, run_dir, resume=resume, progress=progress)
        finish_run(run_dir, self.results_runs, self.options)
        return summary


def _finish_task(run_dir: str, results_runs: str, options: dict[str, Any], cpus: float,
                 heap: bool = False) -> list[str]:
    if heap:
        keep_heap()  # as the sweep's training tasks (rapa.heap)
    torch.set_num_threads(max(1, int(cpus)))
    return finish_run(run_dir, results_runs, options)


# -------------------------------------------------------------------------- progress


def _epochs_and_speed(run_dir: Path) -> tuple[int, float | None]:
    """Epochs in the run's metrics and its mean seconds per epoch."""
    try:
        rows = rundir.read_metrics(run_dir)
    except RapaError:
        return rundir.metric_rows(run_dir), None
    secs = [r["seconds"] for r in rows if not math.isnan(r.get("seconds", math.nan))]
    return len(rows), (sum(secs) / len(secs) if secs else None)


@dataclass
class Progress:
    """Runs done out of the total and an estimate of the time left, from the run directories."""

    runs: Sequence[Any]
    """The battery's RunSpecs."""
    out: Path
    """The working folder (run directories)."""
    results_runs: Path
    """The results tree's runs folder."""
    options: dict[str, Any]
    """Analysis options (to tell analysed runs)."""
    workers: int = 1
    """Runs trained at once."""
    t0: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        """``[battery] 7/24 runs done (analysed, in results), 40/144 epochs, 35 min elapsed, about 80 min left``."""
        done = epochs = total_epochs = 0
        speeds: dict[str, list[float]] = {}
        tails: dict[str, list[float]] = {}  # seconds from the last epoch's checkpoint to the export
        state = []
        for spec in self.runs:
            run_dir, dest = self.out / spec.name, self.results_runs / spec.name
            n, spe = _epochs_and_speed(run_dir)
            n = min(n, spec.config.epochs)
            needs = needed_analyses(spec.config)
            analysed = (dest / rundir.SUMMARY_FILE).is_file() \
                and all(rundir.result_path(dest, k).is_file() for k in needs)
            done += analysed
            epochs += n
            total_epochs += spec.config.epochs
            label = scheme_label(spec.config)
            if spe is not None:
                speeds.setdefault(label, []).append(spe)
            ckpt = run_dir / rundir.CHECKPOINT_FILE
            if analysed and ckpt.is_file():
                last = max(p.stat().st_mtime for p in dest.iterdir())
                tails.setdefault(label, []).append(max(0.0, last - ckpt.stat().st_mtime))
            state.append((spec, n, spe, analysed, label, needs))
        every = [s for v in speeds.values() for s in v]
        left = 0.0
        known = bool(every)
        for spec, n, spe, analysed, label, needs in state:
            if analysed:
                continue
            per = spe or (sum(speeds[label]) / len(speeds[label]) if label in speeds else None) \
                or (sum(every) / len(every) if every else None)
            if per is None:
                continue
            tail = sum(tails[label]) / len(tails[label]) if label in tails else (1.5 if needs else 0.2) * per
            left += (spec.config.epochs - n) * per + tail  # + the final evaluation and the analyses
        busy = min(self.workers, sum(1 for s in state if not s[3])) or 1
        elapsed = (time.perf_counter() - self.t0) / 60
        eta = f"about {left / busy / 60:.0f} min left" if known else "time left: known after the first epoch"
        return (f"[battery] {done}/{len(self.runs)} runs done, {epochs}/{total_epochs} epochs, "
                f"{elapsed:.1f} min elapsed in this session, {eta}")


def _ticker(progress: Progress, say: Callable[[str], None], every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            say(progress.line())
        except Exception:  # noqa: BLE001 - a progress line must never stop the battery
            pass


# ------------------------------------------------------------------------- manifest


def source_commit() -> tuple[str | None, bool]:
    """rapa's git commit (None outside a git checkout) and whether tracked files differ from it."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, False
    if head.returncode != 0:
        return None, False
    return head.stdout.strip(), bool(dirty.stdout.strip())


def commit_results(results: str | Path, message: str, say: Callable[[str], None] = print,
                   attempts: int = 5) -> bool:
    """``git add`` and ``git commit -- RESULTS`` (only that folder) in the repository holding
    ``results``; retried while another process holds git's index lock. False (said) on failure."""
    results = Path(results).resolve()
    top = subprocess.run(["git", "-C", str(results), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        say(f"reproduce: {results} is not in a git repository: nothing committed")
        return False
    root = top.stdout.strip()
    rel = os.path.relpath(results, root)
    for i in range(attempts):
        add = subprocess.run(["git", "-C", root, "add", "--", rel], capture_output=True, text=True)
        out = add
        if add.returncode == 0:
            same = subprocess.run(["git", "-C", root, "diff", "--cached", "--quiet", "HEAD", "--", rel],
                                  capture_output=True, text=True)
            if same.returncode == 0:  # nothing new under the results tree
                return True
            out = subprocess.run(["git", "-C", root, "commit", "-q", "-m", message, "--", rel], capture_output=True,
                                 text=True)
            if out.returncode == 0:
                return True
        if "index.lock" not in out.stderr or i + 1 == attempts:
            say(f"reproduce: git commit of {rel} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
            return False
        time.sleep(2.0 + 2.0 * i)
    return False


def _write_manifest(results: Path, doc: dict[str, Any]) -> None:
    rundir.atomic_write_text(results / MANIFEST, json.dumps(doc, indent=1) + "\n")


# --------------------------------------------------------------------------- battery


def reproduce(experiment: str = STANDARD_EXPERIMENT, out: str | Path | None = None,
              results: str | Path | None = None, budget: dict[str, Any] | None = None, data_dir: str | None = None,
              sweep_options: dict[str, Any] | None = None, attack_limit: int | None = 5000, eot: int = 8,
              device: str = "auto", command: str | None = None, log: Callable[[str], None] | None = None,
              progress_every: float = 300.0, error_metric: str = "final_test_error",
              commit: bool = False) -> Path:
    """Run the battery ``experiment`` into ``out`` (run directories with checkpoints, default
    ``runs/EXPERIMENT``), export its small files to ``results`` (default
    ``results/EXPERIMENT``), and write ``results/REPORT.md`` (returned) and ``claims.json``.

    ``budget``: knobs of :func:`rapa.sweep.experiments.apply_budget`; ``sweep_options``:
    keyword arguments of :func:`rapa.sweep.runner.run_sweep` (address, cpus_per_trial, ...);
    ``attack_limit``: test images attacked and voted on per net; ``command``: the command
    line recorded in the report; ``progress_every``: seconds between progress lines;
    ``error_metric``: the error the claims compare the schemes by (``final_test_error``: the
    final net's one pass; ``best5_test_error``: the paper's 5-epoch average, for long runs);
    ``commit``: ``git commit`` the results tree (only it) after every finished run and at the end.
    """
    import ray

    say = log or (lambda msg: print(msg, flush=True))
    exp = load_experiment(experiment)
    out = Path(out) if out is not None else Path("runs") / exp.name
    results = Path(results) if results is not None else Path("results") / exp.name
    results_runs = results / "runs"
    runs = apply_budget(exp.runs, **(budget or {}))
    if data_dir is not None:
        runs = [dataclasses.replace(r, config=dataclasses.replace(r.config, data_dir=data_dir)) for r in runs]
    datasets = {r.config.dataset for r in runs}
    if len(datasets) != 1:
        raise RapaError(f"a battery must be on one dataset, experiment {exp.name} has {', '.join(sorted(datasets))}")
    options: dict[str, Any] = dict(device=device, attack_limit=attack_limit, eot=eot, snrs=list(BATTERY_SNRS))
    opts = dict(sweep_options or {})
    head, dirty = source_commit()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    old = read_manifest(results) or {}
    sessions = list(old.get("sessions") or []) if old.get("experiment") == exp.name else []
    manifest = {"experiment": exp.name, "description": exp.description, "command": command or
                f"rapa reproduce --experiment {exp.name}", "commit": head, "dirty": dirty,
                "started": (old.get("started") if sessions else None) or started, "runs": len(runs),
                "budget": budget or {}, "analyses": {k: v for k, v in options.items() if k != "device"},
                "error_metric": error_metric, "work_dir": str(out), "wall_seconds": None,
                "sessions": sessions + [{"started": started, "commit": head, "seconds": None}]}
    _write_manifest(results, manifest)
    results_runs.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ray_started = connect(opts.get("address"), opts.pop("num_cpus", None))
    stop = threading.Event()
    try:
        cpus = float(opts.get("cpus_per_trial", 1))
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-9)))
        progress = Progress(runs, out, results_runs, options, workers)
        say(f"reproduce: battery {exp.name}: {len(runs)} runs into {out}, small files into {results_runs}, "
            f"{workers} at a time")
        say(progress.line())
        ticker = threading.Thread(target=_ticker, args=(progress, say, progress_every, stop), daemon=True)
        ticker.start()

        def sweep_log(msg: str) -> None:
            say(msg)
            if "] done " in msg or "FAILED" in msg:
                say(progress.line())
                if commit and "] done " in msg:
                    commit_results(results, f"results/{exp.name}: {msg.split('] done ', 1)[1]}", say)

        result = run_sweep(runs, out, experiment=exp.name, log=sweep_log, train_fn=BatteryTask(str(results_runs),
                                                                                                 options),
                           info={"description": exp.description, "budget": budget or {}}, **opts)
        jobs = [str(out / r.name) for r in runs if (out / r.name / rundir.SUMMARY_FILE).is_file()
                and (missing_analyses(out / r.name, options)
                     or not (results_runs / r.name / rundir.SUMMARY_FILE).is_file())]
        if jobs:
            say(f"reproduce: {len(jobs)} finished runs still need their analyses or export (on Ray)")
            remote = ray.remote(_finish_task).options(num_cpus=cpus, num_gpus=opts.get("gpus_per_trial", 0),
                                                      max_retries=1)
            refs = {remote.remote(j, str(results_runs), options, cpus, kept()): j for j in jobs}
            for ref, j in refs.items():
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the claim that needs it becomes "not measured"
                    say(f"reproduce: analyses of {Path(j).name} FAILED: {type(exc).__name__}: "
                        f"{str(getattr(exc, 'cause', exc)).strip().splitlines()[-1:]}")
                say(progress.line())
    finally:
        stop.set()
        if ray_started:
            ray.shutdown()
    for r in runs:  # everything finished is in the results tree, with the sweep's state
        if rundir.holds_run(out / r.name):
            export_run(out / r.name, results_runs / r.name)
    state = sweep_state_path(out, exp.name)
    if state.is_file():
        shutil.copyfile(state, results_runs / state.name)
    seconds = time.perf_counter() - t0
    manifest["sessions"][-1]["seconds"] = round(seconds, 1)
    manifest["wall_seconds"] = round(sum(s.get("seconds") or 0.0 for s in manifest["sessions"]), 1)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_manifest(results, manifest)
    path = write_battery_report(results, log=say)
    if commit:
        commit_results(results, f"results/{exp.name}: REPORT.md, claims.json ({len(runs)} runs, "
                                f"{manifest['wall_seconds'] / 60:.0f} min)", say)
    say(f"reproduce: {result.count('done')} runs trained now, {result.count('skipped')} before, "
        f"{result.count('failed')} failed; {seconds / 60:.1f} min in this session")
    for c in json.loads((results / "claims.json").read_text()):
        say(f"  {c['verdict_text']:>14}: {c['key']} ({c['n_seeds']} seeds){': ' + c['reason'] if c['reason'] else ''}")
    return path
