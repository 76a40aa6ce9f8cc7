"""``rapa sweep EXPERIMENT --out DIR``: train an experiment's runs on Ray (paper Tables 1-3, Figures 5-7).

EXPERIMENT is a name (``table1``, ``table2``, ``table3``, ``fig5``, ``fig6``, ``fig7``,
``quick``: files in ``experiments/``) or a path to a YAML file. Every run is a Ray task;
without ``--address`` Ray starts on this machine. A crashed run is resumed from its last
checkpoint up to ``--max-retries`` times, then recorded as failed while the sweep goes on.
Running the same command again skips finished runs and resumes the others. The budget
options shrink an experiment without editing it, e.g.
``rapa sweep table1 --out runs/t1 --epochs 20 --datasets cifar10 --limit-train 5000``.
Then ``rapa report DIR`` makes the tables and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from rapa.cli.common import list_type, output_folder

_names = list_type(str)
_ints = list_type(int)  # apply_budget checks the seeds (>= 0)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    p = subparsers.add_parser("sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name (experiments/NAME.yaml) or YAML file")
    p.add_argument("--out", type=Path, help="sweep folder, one run directory per run (default runs/EXPERIMENT)")
    add_ray_arguments(p)
    add_budget_arguments(p)
    p.add_argument("--list", action="store_true", help="print the runs and exit (no training)")
    p.set_defaults(func=run)


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """Where and with what resources the runs execute."""
    p.add_argument("--address", help="Ray cluster to use: HOST:PORT of its head, ray://HOST:PORT or auto "
                                     "(default: start Ray on this machine)")
    p.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per run (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0,
                   help="GPUs per run, fractions share a GPU (default 0: train on the CPU)")
    p.add_argument("--max-retries", type=int, default=2, help="resume a crashed run up to R times (default 2)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a Ray started here (default all)")


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The knobs that shrink an experiment."""
    p.add_argument("--epochs", type=int, help="train every run for N epochs")
    p.add_argument("--datasets", type=_names, help="only runs on these datasets (comma-separated)")
    p.add_argument("--seeds", type=_ints, help="seeds of every run (comma-separated, e.g. 0,1,2)")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, help="use only the first N test images")
    p.add_argument("--data-dir", help="folder holding the dataset files (on every node)")


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """The budget options given (for apply_budget and the state file; lists as lists)."""
    keys = ("epochs", "datasets", "seeds", "limit_train", "limit_test")
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}


def load_runs(args: argparse.Namespace):
    """The experiment named on the command line, shrunk by the budget options."""
    from rapa.sweep.experiments import apply_budget, load_experiment

    exp = load_experiment(args.experiment)
    exp.budget = budget(args)
    exp.runs = apply_budget(exp.runs, **exp.budget)
    if args.data_dir is not None:
        exp.runs = [dataclasses.replace(r, config=dataclasses.replace(r.config, data_dir=args.data_dir))
                    for r in exp.runs]
    return exp


def run(args: argparse.Namespace) -> int:
    from rapa.sweep.runner import run_sweep

    exp = load_runs(args)
    out = args.out if args.out is not None else Path("runs") / exp.name
    if args.list:
        print(f"{exp.name}: {len(exp.runs)} runs" + (f" ({exp.description.splitlines()[0][:100]})"
                                                      if exp.description else ""))
        for r in exp.runs:
            print(f"  {r.name}  epochs={r.config.epochs}")
        return 0
    output_folder(out)  # before Ray starts
    result = run_sweep(exp.runs, out, experiment=exp.name, address=args.address, cpus_per_trial=args.cpus_per_trial,
                       gpus_per_trial=args.gpus_per_trial, max_retries=args.max_retries, num_cpus=args.num_cpus,
                       info={"description": exp.description, "file": str(exp.path), "budget": exp.budget})
    for r in result.failed:
        print(f"  failed: {r.name}: {r.error}")
    print(f"rapa sweep: results in {out}; tables and figures: rapa report {out}")
    return 1 if result.failed else 0
