"""The runs of a sweep folder and their analyses (similarity, reduction, robustness, voting).

:func:`collect_runs` reads every run directory (``config.json``, ``summary.json`` when
finished) and the sweep state files (runs that failed or never started).
:class:`Analyses` computes the per-run analyses of :mod:`rapa.analysis` on finished
floating-point runs and caches them in the run directory, in the files the ``rapa
reduce`` / ``rapa attack`` commands write (``reduce.json``, ``attack.json``); a cache older
than the run's checkpoint is recomputed (``voting.json`` caches the per-image voting
comparison, ``similarity.json`` the filter similarity the same way). A run directory
without its checkpoint (a committed results tree) is read from its caches alone. The files
say the unit in the key (``*_percent``; the one fraction: ``gap_reduction_fraction``);
:class:`Analyses` returns rapa's own keys (``best_error``, ``accuracy``, ``single_error``:
percent), from files written before the units were in the keys too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rapa.config import TrainConfig
from rapa.errors import RapaError

__all__ = ["DATASET_LABELS", "SCHEME_LABELS", "Analyses", "RunRecord", "collect_runs", "dataset_label", "fmt_pct",
           "precision", "scheme_label"]

SCHEME_LABELS = {"none": "no tiling", "perforated": "perforated", "image_overlap": "image w/overlap",
                 "image_pad": "image w/pad", "alternate": "alternate", "random_fixed": "random fixed",
                 "random": "random"}
"""Row names of the paper's tables per scheme."""
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "fashion-mnist": "Fashion-MNIST",
                  "digits": "digits"}
VOTING_FILE_KEYS = {"single_error": "single_error_percent", "vote_error": "vote_error_percent"}
"""How ``voting.json`` names its errors (percent; :func:`rapa.analysis.common.file_keys`)."""
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
    from rapa.models import DEFAULT_CHANNELS, ENLARGED_CHANNELS, PAPER_TILES

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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def collect_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run of ``sweep_dir``: its run directories (one level down, with a config.json)
    and the runs its ``sweep-*.json`` state files know but that have no directory yet.

    RapaError if ``sweep_dir`` is not a folder. Unreadable run directories are skipped.
    """
    from rapa.train import read_config

    root = Path(sweep_dir)
    if not root.is_dir():
        raise RapaError(f"no sweep folder {sweep_dir}")
    records: dict[str, RunRecord] = {}
    for d in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        try:
            config = read_config(d)
        except RapaError:
            continue
        summary = _read_json(d / "summary.json")
        records[d.name] = RunRecord(d.name, d, config, summary, "finished" if summary else "unfinished")
    for state_path in sorted(root.glob("sweep-*.json")):
        state = _read_json(state_path) or {}
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


class Analyses:
    """Per-run analyses, computed on demand and cached in the run directory.

    Args:
        compute: compute what is not cached (False: cached results only).
        device: where the nets run (``auto``, ``cpu``, ``cuda``).
        attack_limit: test images attacked (None: the run's test set).
        reduce_train_limit: training images counted by ``maxpool_winner``.
        eot: random draws averaged by the EOT attack.
        seed: seed of the random draws of the analyses.
        log: called with a line before each computation.
        snrs: the SNRs (dB) of the attacks (default :data:`rapa.analysis.attack.DEFAULT_SNRS`),
            measured on pixel-space images.
    """

    def __init__(self, compute: bool = True, device: str = "auto", attack_limit: int | None = None,
                 reduce_train_limit: int | None = 10000, eot: int = 8, seed: int = 0,
                 log: Callable[[str], None] | None = None, snrs: Sequence[float] | None = None) -> None:
        from rapa.analysis.attack import DEFAULT_SNRS

        self.compute, self.device, self.attack_limit = compute, device, attack_limit
        self.snrs = tuple(float(s) for s in (snrs if snrs is not None else DEFAULT_SNRS))
        self.reduce_train_limit, self.eot, self.seed = reduce_train_limit, eot, seed
        self.log = log or (lambda msg: None)
        self._data: dict[tuple, Any] = {}
        self._memo: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------ plumbing

    def _usable(self, rec: RunRecord) -> bool:
        return rec.finished and rec.config.analog is None and (rec.run_dir / "checkpoint.pt").is_file()

    def _fresh(self, rec: RunRecord, path: Path) -> dict[str, Any] | None:
        ckpt = rec.run_dir / "checkpoint.pt"
        if not path.is_file() or (ckpt.is_file() and path.stat().st_mtime < ckpt.stat().st_mtime):
            return None
        return _read_json(path)

    def _model(self, rec: RunRecord):
        from rapa.train import load_run

        model, _, _ = load_run(rec.run_dir, device=self.device)
        return model

    def dataset(self, config: TrainConfig, split: str, limit: int | None):
        """A split of the run's dataset (cached)."""
        from rapa.data import load_dataset

        key = (config.dataset, split, limit, config.data_dir)
        if key not in self._data:
            self._data[key] = load_dataset(config.dataset, split, data_dir=config.data_dir, limit=limit)
        return self._data[key]

    def _cached(self, kind: str, rec: RunRecord, fn: Callable[[], Any]) -> Any:
        key = (kind, str(rec.run_dir))
        if key not in self._memo:
            try:
                self._memo[key] = fn()
            except RapaError as exc:  # e.g. a checkpoint that does not load: leave the cell empty
                self.log(f"  {kind} of {rec.name} skipped: {exc}")
                self._memo[key] = None
        return self._memo[key]

    @staticmethod
    def _write(path: Path, value: dict[str, Any], names: dict[str, str] | None = None) -> None:
        from rapa.analysis.common import file_keys, json_safe

        try:
            path.write_text(json.dumps(json_safe(file_keys(value, names or {})), indent=1) + "\n")
        except OSError:
            pass  # a read-only sweep folder: the result is used, not cached

    # ------------------------------------------------------------------ analyses

    def similarity(self, rec: RunRecord) -> dict[str, Any] | None:
        """:func:`rapa.analysis.filter_similarity` of a tiled FP run (None: not tiled / not available)."""
        if not rec.finished or rec.config.scheme in ("none", "perforated") or rec.config.tiles is None \
                or rec.config.analog is not None:
            return None
        path = rec.run_dir / "similarity.json"
        cached = self._fresh(rec, path)
        if cached is not None and "overall" in cached:
            return cached
        if not self._usable(rec):
            return None

        def run() -> dict[str, Any] | None:
            from rapa.analysis.similarity import filter_similarity

            try:
                value = filter_similarity(self._model(rec))
            except RapaError:  # "model has no tiled layer" (tiles (1,1,1))
                return None
            self._write(path, value)
            return value
        return self._cached("similarity", rec, run)

    def reduction(self, rec: RunRecord) -> dict[str, Any] | None:
        """Reduced-net errors (percent) per method of a tiled FP run (``reduce.json``)."""
        if rec.config.scheme in ("none", "perforated") or rec.config.tiles is None or not rec.finished:
            return None
        from rapa.analysis.common import read_keys
        from rapa.analysis.reduce import REDUCE_FILE_KEYS

        path = rec.run_dir / "reduce.json"
        cached = self._fresh(rec, path)
        cached = None if cached is None else read_keys(cached, REDUCE_FILE_KEYS)
        if cached is not None and "methods" in cached:
            return cached
        if not self.compute or not self._usable(rec):
            return None

        def run() -> dict[str, Any] | None:
            import torch

            from rapa.analysis.reduce import classification_error, reduce_errors

            self.log(f"  reducing {rec.name}")
            model = self._model(rec)
            test = self.dataset(rec.config, "test", rec.config.limit_test)
            limit = rec.config.limit_train
            if self.reduce_train_limit is not None:
                limit = min(limit or self.reduce_train_limit, self.reduce_train_limit)
            train = self.dataset(rec.config, "train", limit)
            torch.manual_seed(self.seed)
            try:
                tiled = classification_error(model, test)
                result = reduce_errors(model, test, train_data=train,
                                       generator=torch.Generator().manual_seed(self.seed))
            except RapaError:
                return None
            value = {"run_dir": str(rec.run_dir), "dataset": rec.config.dataset, "scheme": rec.config.scheme,
                     "pooling": rec.config.pooling, "tiles": list(rec.config.tiles), "test_images": len(test),
                     "train_images": len(train), "tiled_error": tiled, **result}
            self._write(path, value, REDUCE_FILE_KEYS)
            return value
        return self._cached("reduction", rec, run)

    def robustness(self, rec: RunRecord) -> dict[str, Any] | None:
        """:func:`rapa.analysis.robustness_curve` (FGSM, and EOT-FGSM) of an FP run (``attack.json``)."""
        if not rec.finished:
            return None
        from rapa.analysis.attack import AT_FILE_KEYS, CURVE_FILE_KEYS
        from rapa.analysis.common import file_keys, read_keys

        path = rec.run_dir / "attack.json"
        cached = self._fresh(rec, path)
        want = self.attack_limit or rec.config.limit_test
        if cached is not None:
            curve = (cached.get("curves") or {}).get("model")
            curve = read_keys(curve, CURVE_FILE_KEYS) if isinstance(curve, dict) else None
            if curve and {"fgsm", "fgsm_eot"} <= set(curve.get("accuracy", {})) and _same_limit(cached, want) \
                    and curve.get("snr_space") == "pixel" \
                    and [float(s) for s in curve.get("snr_db", [])] == list(self.snrs):
                return curve
        if not self.compute or not self._usable(rec):
            return None

        def run() -> dict[str, Any]:
            import torch

            from rapa.analysis.attack import HUMAN_THRESHOLD_DB, accuracy_at, robustness_curve
            from rapa.data import dataset_info

            self.log(f"  attacking {rec.name}")
            model = self._model(rec)
            test = self.dataset(rec.config, "test", want)
            torch.manual_seed(self.seed)
            info = dataset_info(rec.config.dataset)
            curve = robustness_curve(model, test, self.snrs, attacks=("fgsm", "fgsm_eot"), eot=self.eot,
                                     generator=torch.Generator().manual_seed(self.seed), pixel=(info.mean, info.std))
            at = {a: {"model": accuracy_at(curve["snr_db"], acc, HUMAN_THRESHOLD_DB)}
                  for a, acc in curve["accuracy"].items()}
            self._write(path, {"run_dir": str(rec.run_dir), "baseline_dir": None, "dataset": rec.config.dataset,
                               "limit": want, "test_images": len(test), "snr_db": curve["snr_db"],
                               "curves": {"model": file_keys(curve, CURVE_FILE_KEYS)},
                               "at_db": HUMAN_THRESHOLD_DB,
                               "at_threshold": {a: file_keys(row, AT_FILE_KEYS) for a, row in at.items()}})
            return curve
        return self._cached("robustness", rec, run)

    def voting(self, rec: RunRecord, votes: int = 9) -> dict[str, Any] | None:
        """Per-image comparison of one pass and a ``votes``-vote majority on the test set
        (the first ``attack_limit`` images) of an FP run (``voting.json``): ``{"images",
        "single_error", "vote_error", "only_single_right", "only_vote_right"}``, errors in percent
        (``single_error_percent``, ``vote_error_percent`` in the file)."""
        from rapa.analysis.common import read_keys

        if not rec.finished:
            return None
        path = rec.run_dir / "voting.json"
        cached = self._fresh(rec, path)
        cached = None if cached is None else read_keys(cached, VOTING_FILE_KEYS)
        want = self.attack_limit or rec.config.limit_test
        if cached is not None and cached.get("votes") == votes and _same_limit(cached, want, "images"):
            return cached
        if not self.compute or not self._usable(rec):
            return None

        def run() -> dict[str, Any]:
            import torch

            from rapa.analysis.common import iter_batches, model_device
            from rapa.voting import vote_predictions

            self.log(f"  voting {rec.name}")
            model = self._model(rec).eval()
            test = self.dataset(rec.config, "test", want)
            torch.manual_seed(self.seed)
            n = wrong1 = wrongv = b = c = 0
            with torch.no_grad():
                for x, y in iter_batches(test, 500, model_device(model)):
                    stack = torch.stack([model(x) for _ in range(votes)])  # (votes, N, classes)
                    ok1 = stack[0].argmax(1) == y  # (N,) the first pass alone
                    okv = vote_predictions(stack) == y  # (N,)
                    n += y.shape[0]
                    wrong1 += int((~ok1).sum())
                    wrongv += int((~okv).sum())
                    b += int((ok1 & ~okv).sum())
                    c += int((~ok1 & okv).sum())
            value = {"run_dir": str(rec.run_dir), "limit": want, "images": n, "votes": votes,
                     "single_error": 100.0 * wrong1 / n,
                     "vote_error": 100.0 * wrongv / n, "only_single_right": b, "only_vote_right": c}
            self._write(path, value, VOTING_FILE_KEYS)
            return value
        return self._cached("voting", rec, run)


def _same_limit(cached: dict[str, Any], want: int | None, count_key: str = "test_images") -> bool:
    """Whether a cached analysis used the wanted test images: our caches record ``limit``;
    one written by ``rapa attack`` only its image count."""
    if "limit" in cached:
        return cached["limit"] == want
    return want is not None and cached.get(count_key) == want


def fmt_pct(value: float | None, digits: int = 2) -> str:
    """``12.34`` for a percentage, ``–`` for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"
