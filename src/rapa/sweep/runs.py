"""The runs of a sweep folder and how the paper's tables name them.

:func:`collect_runs` reads every run directory (its config, and its summary when finished:
:mod:`rapa.rundir`) and the sweep state files (runs that failed or never started);
:func:`scheme_label`, :func:`dataset_label` and :func:`precision` give a run's row and
column in the tables. The analyses of the runs are :class:`rapa.sweep.analyses.Analyses`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapa.config import TrainConfig
from rapa.errors import RapaError
from rapa.models import DEFAULT_CHANNELS, ENLARGED_CHANNELS, PAPER_TILES
from rapa.rundir import holds_run, read_config, read_json, read_summary

__all__ = ["DATASET_LABELS", "SCHEME_LABELS", "RunRecord", "collect_runs", "dataset_label", "fmt_pct",
           "precision", "scheme_label"]

SCHEME_LABELS = {"none": "no tiling", "perforated": "perforated", "image_overlap": "image w/overlap",
                 "image_pad": "image w/pad", "alternate": "alternate", "random_fixed": "random fixed",
                 "random": "random"}
"""Row names of the paper's tables per scheme."""
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fashion-mnist": "Fashion-MNIST",
                  "digits": "digits"}
FP_PRESETS = (None, "ideal")
"""Analog settings that count as floating point ("ideal" is an exact analog tile)."""


@dataclass
class RunRecord:
    """One run of a sweep folder."""

    name: str
    """Folder name."""
    run_dir: Path
    """Its directory."""
    config: TrainConfig
    """Its settings."""
    summary: dict[str, Any] | None = None
    """summary.json once finished."""
    status: str = "unfinished"
    """finished, unfinished (no summary yet), failed (per the sweep state) or pending."""
    error: str | None = None
    """The sweep's last error for it."""

    @property
    def finished(self) -> bool:
        return self.summary is not None


def precision(config: TrainConfig) -> str:
    """``FP`` (digital, or the exact ``ideal`` analog preset) or ``RPU`` (any other analog preset)."""
    return "FP" if config.analog in FP_PRESETS else "RPU"


def scheme_label(config: TrainConfig) -> str:
    """The table row of a run: ``no tiling``, ``no tiling enlarged``, ``random``, ``random (128,32,8)``..."""
    untiled = config.scheme == "none" or config.tiles is None
    label = SCHEME_LABELS["none" if untiled else config.scheme]
    channels = tuple(config.channels)
    if channels == tuple(ENLARGED_CHANNELS):
        label += " enlarged"
    elif channels != tuple(DEFAULT_CHANNELS):
        label += " c(" + ",".join(map(str, channels)) + ")"
    if not untiled and tuple(config.tiles) != tuple(PAPER_TILES):
        label += " (" + ",".join(map(str, config.tiles)) + ")"
    return label


def dataset_label(config: TrainConfig) -> str:
    """``CIFAR-10``, with ``+`` for strong augmentation (the paper's "CIFAR-10+")."""
    name = DATASET_LABELS.get(config.dataset, config.dataset)
    return name + ("+" if config.augment == "strong" else "")


def collect_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run of ``sweep_dir``: its run directories (one level down, with a config.json)
    and the runs its ``sweep-*.json`` state files know but that have no directory yet.

    RapaError if ``sweep_dir`` is not a folder. Unreadable run directories are skipped.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise RapaError(f"no sweep folder {sweep_dir}")
    records: dict[str, RunRecord] = {}
    for d in sorted(p for p in root.iterdir() if holds_run(p)):
        try:
            config = read_config(d)
        except RapaError:
            continue
        summary = read_summary(d)
        records[d.name] = RunRecord(d.name, d, config, summary, "finished" if summary else "unfinished")
    for state_path in sorted(root.glob("sweep-*.json")):
        state = read_json(state_path) or {}
        for name, entry in (state.get("runs") or {}).items():
            rec = records.get(name)
            if rec is None:
                try:
                    config = TrainConfig.from_dict(entry["config"])
                except (RapaError, KeyError, TypeError):
                    continue
                rec = records[name] = RunRecord(name, root / name, config, None, "pending")
            if not rec.finished and entry.get("status") == "failed":
                rec.status, rec.error = "failed", entry.get("error")
    return list(records.values())


def fmt_pct(value: float | None, digits: int = 2) -> str:
    """``12.34`` for a percentage, ``–`` for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"
