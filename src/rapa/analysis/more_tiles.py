"""More tiles (paper §3.3, Fig. 5): test error of runs with proportionally more tiles.

Given run directories of the same net with tilings ``(16,4,1)``, ``(64,16,4)``, ...
(read from each run's config.json), :func:`more_tiles_curves` collects the test error
per epoch (metrics.csv; single-pass errors, the paper's Fig. 5A shows 9-vote errors) and
the best error, the 5-epoch-average best of SPEC §3 (summary.json's
``best5_test_error`` when present, else computed from metrics.csv). The best errors are
compared with the ``(16,4,1)`` run of the same dataset (Fig. 5B; runs of that tiling
are averaged if there are several); a dataset without one is compared with its run of
fewest first-layer tiles. :func:`plot_more_tiles` draws both panels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from rapa import rundir
from rapa.errors import RapaError
from rapa.rundir import read_config
from rapa.train import best_moving_average

__all__ = ["REFERENCE_TILES", "more_tiles_curves", "plot_more_tiles", "read_metrics"]

REFERENCE_TILES: tuple[int, int, int] = (16, 4, 1)


def read_metrics(run_dir: str | Path) -> dict[str, list[float]]:
    """Columns ``epoch``, ``train_error``, ``test_error`` (fractions; NaN where not
    measured) of the run's metrics (:func:`rapa.rundir.read_metrics`); RapaError if they
    are missing or malformed."""
    rows = rundir.read_metrics(run_dir)
    try:
        return {"epoch": [int(r["epoch"]) for r in rows], "train_error": [r["train_error"] for r in rows],
                "test_error": [r["test_error"] for r in rows]}
    except (KeyError, ValueError) as exc:
        raise RapaError(f"{Path(run_dir) / rundir.METRICS_FILE} is malformed: missing or bad {exc}") from None


def _best_error(run_dir: Path, metrics: dict[str, list[float]]) -> float:
    value = (rundir.read_summary(run_dir, strict=True) or {}).get("best5_test_error")
    if value is not None:
        return float(value)
    best = best_moving_average(metrics["test_error"], metrics["train_error"])["test_error"]
    return float("nan") if best is None else float(best)


def more_tiles_curves(run_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Error curves and relative best errors of runs with different numbers of tiles.

    Returns ``{"runs": [...], "reference": {dataset: tiles}}``, runs sorted by dataset and
    first-layer tiles, each ``{"run_dir", "dataset", "scheme", "tiles", "epochs",
    "test_error", "train_error", "best_test_error", "relative_best", "delta_best"}``
    (errors as fractions; ``relative_best`` = best / reference best, ``delta_best`` =
    best - reference best). RapaError for a missing run or a config of another version.
    """
    if not run_dirs:
        raise RapaError("no run directories given")
    runs: list[dict[str, Any]] = []
    for d in run_dirs:
        d = Path(d)
        config = read_config(d)  # RapaError: missing dir, no config, other version
        metrics = read_metrics(d)
        tiles = tuple(config.tiles) if config.tiles is not None and config.scheme != "none" else (1, 1, 1)
        runs.append({"run_dir": str(d), "dataset": config.dataset, "scheme": config.scheme, "tiles": list(tiles),
                     "epochs": metrics["epoch"], "test_error": metrics["test_error"],
                     "train_error": metrics["train_error"], "best_test_error": _best_error(d, metrics)})
    runs.sort(key=lambda r: (r["dataset"], r["tiles"][0], r["tiles"], r["run_dir"]))
    reference: dict[str, list[int]] = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        group = [r for r in runs if r["dataset"] == dataset]
        ref_tiles = list(REFERENCE_TILES) if any(r["tiles"] == list(REFERENCE_TILES) for r in group) \
            else group[0]["tiles"]
        ref = [r["best_test_error"] for r in group if r["tiles"] == ref_tiles]
        ref_best = math.fsum(ref) / len(ref)
        reference[dataset] = ref_tiles
        for r in group:
            r["relative_best"] = r["best_test_error"] / ref_best if ref_best > 0 else float("nan")
            r["delta_best"] = r["best_test_error"] - ref_best
    return {"runs": runs, "reference": reference}


def _label(run: dict[str, Any], many_datasets: bool) -> str:
    tiles = "(" + ",".join(map(str, run["tiles"])) + ")"
    return f"{run['dataset']} {tiles}" if many_datasets else tiles


def plot_more_tiles(curves: dict[str, Any], path: str | Path) -> None:
    """Fig. 5: (A) test error against epoch per tiling; (B) best test error relative to
    the reference tiling against the first layer's tiles (log scale), one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = curves["runs"]
    datasets = sorted({r["dataset"] for r in runs})
    many = len(datasets) > 1
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for j, r in enumerate(runs):
        pts = [(e, 100 * t) for e, t in zip(r["epochs"], r["test_error"]) if not math.isnan(t)]
        if pts:
            ax_a.plot(*zip(*pts), color=f"C{j % 10}", lw=1.2, label=_label(r, many))
    ax_a.set_xlabel("epoch")
    ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, even for a 2-epoch run
    ax_a.set_ylabel("test error (%)")
    ax_a.set_title("A: test error per tiling")
    ax_a.legend(fontsize=7)
    for j, dataset in enumerate(datasets):
        pts = sorted((r["tiles"][0], r["relative_best"]) for r in runs if r["dataset"] == dataset)
        ax_b.plot(*zip(*pts), "o-", color=f"C{j % 10}", label=dataset)
    ax_b.axhline(1.0, color="0.5", lw=0.8)
    ax_b.set_xscale("log", base=2)
    ax_b.set_xlabel("tiles of the first conv layer")
    ax_b.set_ylabel("best test error / reference")
    refs = ", ".join(f"{d} (" + ",".join(map(str, t)) + ")" for d, t in curves["reference"].items())
    ax_b.set_title(f"B: best error relative to {refs}", fontsize=8)
    ax_b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
