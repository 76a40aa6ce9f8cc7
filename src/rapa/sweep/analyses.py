"""The per-run analyses of a sweep (similarity, reduction, robustness, voting), cached in the run directories.

:class:`Analyses` computes the analyses of :mod:`rapa.analysis` on finished floating-point
runs and caches them in the run directory, in the result files the ``rapa reduce`` /
``rapa attack`` / ``rapa similarity`` commands write (:data:`rapa.rundir.RESULT_FILES`:
each analysis computes and saves its record itself, for the commands and the sweeps
alike); a cache older than the run's checkpoint is recomputed. A run directory without its
checkpoint (a committed results tree) is read from its caches alone. The files say the
unit in the key (``*_percent``; the one fraction: ``gap_reduction_fraction``);
:class:`Analyses` returns rapa's own keys (``best_error``, ``accuracy``, ``single_error``:
percent), from files written before the units were in the keys too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from rapa import rundir
from rapa.analysis.attack import (DEFAULT_SNRS, attack_record, attack_runs, read_attack, save_attack,
                                  threshold_accuracies)
from rapa.analysis.reduce import read_reduction, reduce_run, save_reduction
from rapa.analysis.similarity import read_similarity, save_similarity, similarity_run
from rapa.analysis.voting import VOTING_FILE_KEYS, read_voting, save_voting, voting_run
from rapa.config import TrainConfig
from rapa.data import dataset_info, load_dataset
from rapa.errors import OutputError, RapaError
from rapa.sweep.runs import RunRecord
from rapa.train import load_run

__all__ = ["VOTING_FILE_KEYS", "Analyses"]


def _cache(save: Callable[[Any, dict[str, Any]], Any], rec: RunRecord, record: dict[str, Any]) -> None:
    """``save`` the record in the run directory, unless the folder is read-only (then the
    result is used, not cached)."""
    try:
        save(rec.run_dir, record)
    except OutputError:
        pass


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
        self.compute, self.device, self.attack_limit = compute, device, attack_limit
        self.snrs = tuple(float(s) for s in (snrs if snrs is not None else DEFAULT_SNRS))
        self.reduce_train_limit, self.eot, self.seed = reduce_train_limit, eot, seed
        self.log = log or (lambda msg: None)
        self._data: dict[tuple, Any] = {}
        self._memo: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------ plumbing

    def _usable(self, rec: RunRecord) -> bool:
        return rec.finished and rec.config.analog is None and (rec.run_dir / rundir.CHECKPOINT_FILE).is_file()

    def _model(self, rec: RunRecord) -> torch.nn.Module:
        model, _, _ = load_run(rec.run_dir, device=self.device)
        return model

    def dataset(self, config: TrainConfig, split: str, limit: int | None):
        """A split of the run's dataset (cached)."""
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

    # ------------------------------------------------------------------ analyses

    def similarity(self, rec: RunRecord) -> dict[str, Any] | None:
        """:func:`rapa.analysis.filter_similarity` of a tiled FP run (None: not tiled / not available)."""
        if not rec.finished or rec.config.scheme in ("none", "perforated") or rec.config.tiles is None \
                or rec.config.analog is not None:
            return None
        cached = read_similarity(rec.run_dir, fresh=True)
        if cached is not None and "overall" in cached:
            return cached
        if not self._usable(rec):
            return None

        def run() -> dict[str, Any] | None:
            try:
                value = similarity_run(self._model(rec))
            except RapaError:  # "model has no tiled layer" (tiles (1,1,1))
                return None
            _cache(save_similarity, rec, value)
            return value
        return self._cached("similarity", rec, run)

    def reduction(self, rec: RunRecord) -> dict[str, Any] | None:
        """Reduced-net errors (percent) per method of a tiled FP run (``reduce.json``)."""
        if rec.config.scheme in ("none", "perforated") or rec.config.tiles is None or not rec.finished:
            return None
        cached = read_reduction(rec.run_dir, fresh=True)
        if cached is not None and "methods" in cached:
            return cached
        if not self.compute or not self._usable(rec):
            return None

        def run() -> dict[str, Any] | None:
            self.log(f"  reducing {rec.name}")
            model = self._model(rec)
            test = self.dataset(rec.config, "test", rec.config.limit_test)
            limit = rec.config.limit_train
            if self.reduce_train_limit is not None:
                limit = min(limit or self.reduce_train_limit, self.reduce_train_limit)
            train = self.dataset(rec.config, "train", limit)
            try:
                value = reduce_run(model, rec.config, test, train, seed=self.seed, run_dir=rec.run_dir)
            except RapaError:
                return None
            _cache(save_reduction, rec, value)
            return value
        return self._cached("reduction", rec, run)

    def robustness(self, rec: RunRecord) -> dict[str, Any] | None:
        """:func:`rapa.analysis.robustness_curve` (FGSM, and EOT-FGSM) of an FP run (``attack.json``)."""
        if not rec.finished:
            return None
        cached = read_attack(rec.run_dir, fresh=True)
        want = self.attack_limit or rec.config.limit_test
        if cached is not None:
            curve = (cached.get("curves") or {}).get("model")
            curve = curve if isinstance(curve, dict) else None
            if curve and {"fgsm", "fgsm_eot"} <= set(curve.get("accuracy", {})) and _same_limit(cached, want) \
                    and curve.get("snr_space") == "pixel" \
                    and [float(s) for s in curve.get("snr_db", [])] == list(self.snrs):
                return curve
        if not self.compute or not self._usable(rec):
            return None

        def run() -> dict[str, Any]:
            self.log(f"  attacking {rec.name}")
            model = self._model(rec)
            test = self.dataset(rec.config, "test", want)
            info = dataset_info(rec.config.dataset)
            attacks = ("fgsm", "fgsm_eot")
            curves = attack_runs({"model": model}, test, self.snrs, attacks, eot=self.eot, seed=self.seed,
                                 pixel=(info.mean, info.std))
            record = attack_record(curves, threshold_accuracies(curves, attacks), rec.run_dir, rec.config.dataset,
                                   len(test), limit=want)
            _cache(save_attack, rec, record)
            return curves["model"]
        return self._cached("robustness", rec, run)

    def voting(self, rec: RunRecord, votes: int = 9) -> dict[str, Any] | None:
        """Per-image comparison of one pass and a ``votes``-vote majority on the test set
        (the first ``attack_limit`` images) of an FP run (``voting.json``): ``{"images",
        "single_error", "vote_error", "only_single_right", "only_vote_right"}``, errors in percent
        (``single_error_percent``, ``vote_error_percent`` in the file)."""
        if not rec.finished:
            return None
        cached = read_voting(rec.run_dir, fresh=True)
        want = self.attack_limit or rec.config.limit_test
        if cached is not None and cached.get("votes") == votes and _same_limit(cached, want, "images"):
            return cached
        if not self.compute or not self._usable(rec):
            return None

        def run() -> dict[str, Any]:
            self.log(f"  voting {rec.name}")
            model = self._model(rec)
            test = self.dataset(rec.config, "test", want)
            value = voting_run(model, test, votes, self.seed, rec.run_dir, limit=want)
            _cache(save_voting, rec, value)
            return value
        return self._cached("voting", rec, run)


def _same_limit(cached: dict[str, Any], want: int | None, count_key: str = "test_images") -> bool:
    """Whether a cached analysis used the wanted test images: our caches record ``limit``;
    one written by ``rapa attack`` only its image count."""
    if "limit" in cached:
        return cached["limit"] == want
    return want is not None and cached.get(count_key) == want
