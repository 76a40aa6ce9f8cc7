"""The paper's experiments as sweeps: experiment files, Ray execution, tables and figures.

* :mod:`~rapa.sweep.experiments`: read ``experiments/NAME.yaml``, expand its grid into
  named runs, shrink it with budget knobs.
* :mod:`~rapa.sweep.runner`: run the runs as Ray tasks (retries, resume, skip finished).
* :mod:`~rapa.sweep.runs`: the runs of a sweep folder and their names in the tables.
* :mod:`~rapa.sweep.analyses`: their analyses (:mod:`rapa.analysis`), cached in the run
  directories.
* :mod:`~rapa.sweep.report`: the paper's tables (:mod:`~rapa.sweep.tables`, Markdown and
  CSV) and figures (:mod:`~rapa.sweep.figures`) from a sweep folder.
* :mod:`~rapa.sweep.reproduce`: ``rapa reproduce``, a battery of seeded runs with their
  analyses, exported to a results tree as they finish; the paper's claims
  (:mod:`~rapa.sweep.claims`, on per-seed numbers from :mod:`~rapa.sweep.evidence`, with
  the intervals of :mod:`~rapa.sweep.stats`) with verdicts in the report of
  :mod:`~rapa.sweep.battery_report`.

Ray is imported only when a sweep runs (``pip install "rapa[ray]"``).
"""

from rapa.sweep.experiments import (Experiment, RunSpec, apply_budget, expand, find_experiment, list_experiments,
                                    load_experiment, run_name)
from rapa.sweep.runner import RunOutcome, SweepResult, check_address, is_finished, run_sweep

__all__ = ["Experiment", "RunOutcome", "RunSpec", "SweepResult", "apply_budget", "check_address", "expand",
           "find_experiment", "is_finished", "list_experiments", "load_experiment", "run_name", "run_sweep"]
