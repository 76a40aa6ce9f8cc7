"""Experiments: YAML files naming a grid of training runs, expanded into named configs.

An experiment file (``experiments/table1.yaml``) holds::

    description: Table 1, ...           # free text
    base:                               # TrainConfig defaults of every run
      epochs: 700
      tiles: [16, 4, 1]
    grid:                               # lists, expanded as a product
      dataset: [cifar10, cifar100, svhn]
      scheme: [none, random]
    runs:                               # explicit extra runs (over ``base``)
      - scheme: none
        channels: [54, 64, 64]
        grid: {dataset: [cifar10, cifar100, svhn]}   # optional: a product of its own

Every key is a field of :class:`rapa.config.TrainConfig`; a file with neither ``grid``
nor ``runs`` is the single run ``base``. A run's name is a readable
slug plus a hash of the settings that change its trajectory (:func:`run_name`): the
same settings give the same name in every experiment, so runs shared by two
experiments are trained once when they are swept into the same folder. ``epochs`` is
not part of the name: a longer sweep continues a shorter one's runs.

Budget knobs (:func:`apply_budget`) shrink an experiment without editing it:
``epochs``, ``datasets`` (keep only those), ``seeds`` (replace the seeds), ``limit_train``
and ``limit_test``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rapa.config import TrainConfig
from rapa.data import canonical_name
from rapa.errors import RapaError
from rapa.rundir import RESUMABLE_FIELDS

__all__ = ["EXPERIMENT_KEYS", "NAME_IGNORES", "Experiment", "RunSpec", "apply_budget", "experiment_dirs",
           "expand", "find_experiment", "list_experiments", "load_experiment", "normalise", "run_name"]

EXPERIMENT_KEYS = ("description", "base", "grid", "runs")
"""Top-level keys of an experiment file."""
NAME_IGNORES = RESUMABLE_FIELDS
"""Config fields left out of a run's name hash: they do not change the trained weights of
an epoch (:data:`rapa.rundir.RESUMABLE_FIELDS`, the ones a resumed run may change)."""
_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_DEFAULTS = TrainConfig()


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep: its stable name and its config."""

    name: str
    """Directory name of the run inside the sweep folder (:func:`run_name`)."""
    config: TrainConfig
    """The run's settings."""


@dataclass
class Experiment:
    """A named list of runs, from an experiment file."""

    name: str
    """The experiment's name (its file name without ``.yaml``)."""
    runs: list[RunSpec]
    """The runs, in file order, without duplicates."""
    description: str = ""
    """Free text from the file."""
    path: Path | None = None
    """The file it was read from."""
    budget: dict[str, Any] = field(default_factory=dict)
    """Budget knobs applied to it (:func:`apply_budget`)."""


# ------------------------------------------------------------------------------ names


def normalise(config: TrainConfig) -> TrainConfig:
    """``config`` with an untiled net written one way (``scheme="none", tiles=None``),
    tuples for ``tiles``/``channels`` and the canonical dataset name."""
    untiled = config.scheme == "none" or config.tiles is None
    try:
        dataset = canonical_name(config.dataset)
    except ValueError as exc:
        raise RapaError(str(exc)) from None
    return dataclasses.replace(config, dataset=dataset, scheme="none" if untiled else config.scheme,
                               tiles=None if untiled else tuple(config.tiles),  # type: ignore[arg-type]
                               channels=tuple(config.channels))  # type: ignore[arg-type]


def run_name(config: TrainConfig) -> str:
    """Stable name of a run: ``DATASET-SCHEME[-TILES][-cCHANNELS][-POOL][-AUG][-ANALOG]-sSEED-HASH``.

    The slug shows the main settings (defaults left out); ``HASH`` (8 hex digits) is a
    digest of every setting that changes the trajectory (all but :data:`NAME_IGNORES`,
    with the learning rate resolved), so two runs share a name exactly when they train
    the same net the same way. Does not depend on the order of keys in a file.
    """
    c = normalise(config)
    parts = [c.dataset, "untiled" if c.scheme == "none" else c.scheme]
    if c.tiles is not None:
        parts.append("x".join(map(str, c.tiles)))
    if c.channels != tuple(_DEFAULTS.channels):
        parts.append("c" + "x".join(map(str, c.channels)))
    if c.pooling != _DEFAULTS.pooling:
        parts.append(c.pooling)
    if c.augment != _DEFAULTS.augment:
        parts.append(c.augment)
    if c.analog is not None:
        parts.append(_slug(c.analog))
    parts.append(f"s{c.seed}")
    key = {k: v for k, v in c.to_dict().items() if k not in NAME_IGNORES}
    for k in ("weight_decay", "wd_factor"):  # the unused one of the two: names of legacy runs stay as they were
        if key.get(k) is None:
            key.pop(k, None)
    for k in ("digital_layers", "tile_lr_power", "analog_options", "layer_lr_scale"):  # added after the battery ran: defaults leave names as they were
        if not key.get(k):
            key.pop(k, None)
    # added after the battery ran: independent tiles (every run then) leave names as they were; otherwise
    # the resolved value counts (--analog's default, replicate, trains another net than independent)
    tile_init = c.resolved_tile_init()
    key.pop("tile_init")
    if tile_init != "independent":
        key["tile_init"] = tile_init
    key["lr"] = c.resolved_lr()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return "-".join(parts + [digest])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text.lower()).strip("-")


# ------------------------------------------------------------------------- expansion


def _check_keys(where: str, mapping: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        hint = "" if allowed - _FIELDS else " (keys of rapa.config.TrainConfig)"
        raise RapaError(f"{where}: unknown key(s) {', '.join(unknown)}{hint}")


def _product(where: str, grid: Any) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if not isinstance(grid, Mapping):
        raise RapaError(f"{where}: grid must be a mapping of key: [values], got {type(grid).__name__}")
    _check_keys(where, grid, _FIELDS)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RapaError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _make_config(where: str, settings: Mapping[str, Any]) -> TrainConfig:
    try:
        config = TrainConfig(**settings)
    except TypeError as exc:
        raise RapaError(f"{where}: {exc}") from None
    config = normalise(config)
    try:  # the device is checked where the run executes (a GPU node), not here
        dataclasses.replace(config, device="cpu").validate()
    except RapaError as exc:
        raise RapaError(f"{where}: {exc}") from None
    return config


def expand(doc: Mapping[str, Any], source: str = "experiment") -> list[RunSpec]:
    """The runs of an experiment document (the parsed YAML), named, without duplicates.

    RapaError naming ``source`` and the entry for unknown keys, non-list grid values or
    a config that would not train.
    """
    if not isinstance(doc, Mapping):
        raise RapaError(f"{source}: an experiment must be a mapping with keys {', '.join(EXPERIMENT_KEYS)}")
    _check_keys(source, doc, EXPERIMENT_KEYS)
    base = doc.get("base") or {}
    if not isinstance(base, Mapping):
        raise RapaError(f"{source}: base must be a mapping of TrainConfig keys")
    _check_keys(f"{source}: base", base, _FIELDS)
    entries: list[tuple[str, dict[str, Any]]] = []
    if doc.get("grid") is not None or not doc.get("runs"):
        for combo in _product(f"{source}: grid", doc.get("grid")):
            entries.append((f"{source}: grid {combo}", {**base, **combo}))
    extra = doc.get("runs") or []
    if not isinstance(extra, list):
        raise RapaError(f"{source}: runs must be a list of mappings")
    for i, entry in enumerate(extra):
        where = f"{source}: runs[{i}]"
        if not isinstance(entry, Mapping):
            raise RapaError(f"{where} must be a mapping of TrainConfig keys")
        fixed = {k: v for k, v in entry.items() if k != "grid"}
        _check_keys(where, fixed, _FIELDS)
        for combo in _product(where, entry.get("grid")):
            entries.append((f"{where} {combo}" if combo else where, {**base, **fixed, **combo}))
    return _dedupe(RunSpec(run_name(cfg), cfg) for cfg in (_make_config(w, s) for w, s in entries))


def _dedupe(runs: Iterable[RunSpec]) -> list[RunSpec]:
    seen: dict[str, RunSpec] = {}
    for r in runs:
        seen.setdefault(r.name, r)
    return list(seen.values())


def apply_budget(runs: Sequence[RunSpec], epochs: int | None = None, datasets: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, limit_train: int | None = None,
                 limit_test: int | None = None) -> list[RunSpec]:
    """The runs shrunk by the budget knobs, renamed where the settings changed.

    ``epochs`` replaces every run's epochs; ``datasets`` keeps only runs on those
    datasets (RapaError for one the experiment does not have); ``seeds`` replaces each
    run's seed by every given seed; ``limit_train``/``limit_test`` cap the images.
    """
    out = list(runs)
    if datasets is not None:
        try:
            wanted = [canonical_name(d) for d in datasets]
        except ValueError as exc:
            raise RapaError(str(exc)) from None
        have = sorted({r.config.dataset for r in out})
        missing = [d for d in wanted if d not in have]
        if missing:
            raise RapaError(f"the experiment has no runs on {', '.join(missing)}; it has {', '.join(have)}")
        out = [r for r in out if r.config.dataset in wanted]
    changes: dict[str, Any] = {}
    for key, value, low in (("epochs", epochs, 1), ("limit_train", limit_train, 1), ("limit_test", limit_test, 1)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RapaError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {value!r}")
            changes[key] = value
    if seeds is not None:
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise RapaError(f"--seeds must be non-negative integers, got {list(seeds)!r}")
    shrunk: list[RunSpec] = []
    for r in out:
        for seed in (seeds if seeds is not None else [r.config.seed]):
            cfg = dataclasses.replace(r.config, seed=seed, **changes)
            shrunk.append(RunSpec(run_name(cfg), cfg))
    return _dedupe(shrunk)


# ------------------------------------------------------------------------------ files


def experiment_dirs() -> list[Path]:
    """Folders searched for ``NAME.yaml``: ``$RAPA_EXPERIMENTS``, ``./experiments``, and the
    ``experiments/`` folder of the source tree this package was installed from."""
    dirs = []
    env = os.environ.get("RAPA_EXPERIMENTS")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(Path.cwd() / "experiments")
    dirs.append(Path(__file__).resolve().parents[3] / "experiments")  # src/rapa/sweep -> repository root
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def list_experiments() -> dict[str, Path]:
    """Experiment name -> file, over :func:`experiment_dirs` (earlier folders win)."""
    found: dict[str, Path] = {}
    for d in experiment_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def find_experiment(name: str) -> Path:
    """The file of experiment ``name`` (a name or a path to a ``.yaml`` file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise RapaError(f"no experiment file {name}")
        return path
    found = list_experiments()
    if name not in found:
        known = ", ".join(sorted(found)) or "none found"
        raise RapaError(f"unknown experiment {name!r}; known: {known} (searched "
                        f"{', '.join(str(d) for d in experiment_dirs()) or './experiments'})")
    return found[name]


def load_experiment(name: str) -> Experiment:
    """Read and expand experiment ``name`` (see :func:`find_experiment`)."""
    import yaml

    path = find_experiment(name)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RapaError(f"cannot read experiment {path}: {exc}") from None
    runs = expand(doc, str(path))
    return Experiment(name=path.stem, runs=runs, description=str((doc or {}).get("description") or "").strip(),
                      path=path)
