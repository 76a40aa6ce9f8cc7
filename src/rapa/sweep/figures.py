"""The paper's Figures 5, 6A and 7 (with their numbers as tables) from the runs of a sweep folder.

* Figure 5: random tiling with more tiles: (A) test error per epoch, (B) best test error
  relative to (16,4,1), per dataset (:mod:`rapa.analysis.more_tiles`).
* Figure 6A: similarity of the filters across tiles per scheme and dataset x pooling.
* Figure 7: accuracy under FGSM and EOT-FGSM by SNR, with the gap reduction against the
  untiled net at 33 dB (:mod:`rapa.analysis.attack`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from rapa.analysis.attack import HUMAN_THRESHOLD_DB, accuracy_at, gap_reduction, plot_robustness
from rapa.analysis.more_tiles import more_tiles_curves, plot_more_tiles
from rapa.sweep.analyses import Analyses
from rapa.sweep.experiments import NAME_IGNORES
from rapa.sweep.runs import DATASET_LABELS, RunRecord, dataset_label, fmt_pct, scheme_label
from rapa.sweep.tables import MISSING, POOL_ORDER, TILED_ROWS, Table, best_run, column_key, dataset_key, table_rows

__all__ = ["more_tiles_table", "plot_similarity", "robustness_table", "similarity_table"]


def similarity_table(records: Sequence[RunRecord], analyses: Analyses) -> Table | None:
    """Figure 6A's numbers: mean filter correlation across tiles per scheme and dataset x pooling."""
    sel = [r for r in records if r.config.analog is None and r.config.scheme not in ("none", "perforated")
           and r.config.tiles is not None]
    if not sel:
        return None
    cols = sorted({column_key(r) for r in sel})
    header = ["scheme"] + [f"{label} {POOL_ORDER[p] if p < len(POOL_ORDER) else '?'}" for _, label, p in cols]
    table = Table("fig6a", "Figure 6A: similarity of the filters across tiles (mean correlation)", header, [])
    for row in table_rows((scheme_label(r.config) for r in sel), TILED_ROWS):
        cells = [row]
        for col in cols:
            values = []
            for r in sel:
                if scheme_label(r.config) == row and column_key(r) == col:
                    sim = analyses.similarity(r)
                    if sim is not None:
                        values.append(sim["overall"])
                        table.records.append({"run": r.name, "scheme": row, "dataset": r.config.dataset,
                                              "augment": r.config.augment, "pooling": r.config.pooling,
                                              "similarity": sim["overall"],
                                              **{f"similarity_{k}": v["similarity"] for k, v in sim["layers"].items()}})
            cells.append(MISSING if not values else f"{sum(values) / len(values):.3f}")
        table.rows.append(cells)
    table.notes = ["Pearson correlation of a channel's filter between all pairs of tiles, averaged over channels, "
                   "then over the tiled layers (SPEC §4); 1: identical filters."]
    return table


def _fig7_groups(records: Sequence[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        if r.finished and r.config.analog is None and r.config.pooling == "max" \
                and r.config.scheme in ("none", "random"):
            groups.setdefault((r.config.dataset, r.config.augment), []).append(r)
    return {k: v for k, v in groups.items()
            if any(scheme_label(r.config) == "no tiling" for r in v) and any(r.config.scheme == "random" for r in v)}


def robustness_table(records: Sequence[RunRecord], analyses: Analyses,
                     plot_dir: Path | None = None) -> tuple[Table | None, list[Path]]:
    """Figure 7: accuracy at 33 dB under FGSM and EOT-FGSM and the gap reduction against the
    untiled net, per dataset; with ``plot_dir`` also the curves (``fig7-DATASET.png``)."""
    groups = _fig7_groups(records)
    if not groups:
        return None, []
    header = ["dataset", "net", "clean acc.", f"FGSM acc. @{HUMAN_THRESHOLD_DB:g} dB", "gap reduction",
              f"EOT-FGSM acc. @{HUMAN_THRESHOLD_DB:g} dB", "gap reduction (EOT)"]
    table = Table("fig7", f"Figure 7: robustness to FGSM at {HUMAN_THRESHOLD_DB:g} dB SNR", header, [])
    figures = []
    for (ds, aug), group in sorted(groups.items(), key=lambda kv: (dataset_key(kv[0][0]), kv[0])):
        label_ds = dataset_label(group[0].config)
        nets: dict[str, RunRecord] = {}
        for r in sorted(group, key=lambda r: (r.config.scheme != "none", scheme_label(r.config))):
            label = scheme_label(r.config)
            best = best_run(x for x in group if scheme_label(x.config) == label)
            if best is not None:
                nets.setdefault(label, best)
        curves = {label: analyses.robustness(r) for label, r in nets.items()}
        base = curves.get("no tiling")
        at = {label: {a: (accuracy_at(c["snr_db"], c["accuracy"][a]) if c and a in c["accuracy"] else None)
                      for a in ("fgsm", "fgsm_eot")} for label, c in curves.items()}
        for label, c in curves.items():
            row = [label_ds, label, fmt_pct(c["clean_accuracy"] if c else None)]
            rec = {"dataset": ds, "augment": aug, "net": label, "run": nets[label].name,
                   "clean_accuracy_percent": c["clean_accuracy"] if c else None,
                   "correct_images": c["correct"] if c else None}
            for a in ("fgsm", "fgsm_eot"):
                acc = at[label][a]
                base_acc = at["no tiling"][a] if base else None
                gap = None if acc is None or base_acc is None or label == "no tiling" else gap_reduction(acc, base_acc)
                row += [fmt_pct(acc), "" if label == "no tiling" else fmt_pct(None if gap is None else 100 * gap, 1)]
                rec.update({f"{a}_accuracy_percent": acc, f"{a}_gap_reduction_fraction": gap})  # as attack.json
            table.rows.append(row)
            table.records.append(rec)
        if plot_dir is not None and any(curves.values()):
            path = plot_dir / f"fig7-{ds}{'-' + aug if aug != 'none' else ''}.png"
            plot_robustness({f"{label_ds} {k}": v for k, v in curves.items() if v}, path)
            figures.append(path)
    table.notes = ["Accuracy [%] over the test images each net classified correctly, after FGSM (one random tile "
                   "draw) or EOT-FGSM (gradient averaged over draws) at the given SNR (interpolated); gap reduction "
                   "[%] = (acc - acc_untiled) / (100 - acc_untiled). Deterministic nets: both attacks coincide."]
    return table, figures


def more_tiles_table(records: Sequence[RunRecord], plot_path: Path | None = None) -> Table | None:
    """Figure 5: best test error of random tiling with more tiles relative to (16,4,1), per dataset;
    with ``plot_path`` both panels (error per epoch, relative best) are drawn there."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        if r.finished and r.config.scheme == "random" and r.config.analog is None:
            key = {k: v for k, v in r.config.to_dict().items() if k not in NAME_IGNORES + ("tiles", "seed", "lr")}
            key["lr"] = r.config.resolved_lr()
            groups.setdefault((r.config.dataset, json.dumps(key, sort_keys=True)), []).append(r)
    chosen: dict[str, list[RunRecord]] = {}
    for (ds, _), group in groups.items():
        n = len({tuple(r.config.tiles) for r in group})
        if n >= 2 and n > len({tuple(r.config.tiles) for r in chosen.get(ds, [])}):
            chosen[ds] = group
    if not chosen:
        return None
    curves = more_tiles_curves([r.run_dir for g in chosen.values() for r in g])
    if plot_path is not None:
        plot_more_tiles(curves, plot_path)
    datasets = sorted(chosen, key=dataset_key)
    tilings = sorted({tuple(r["tiles"]) for r in curves["runs"]})
    header = ["tiles"] + [DATASET_LABELS.get(ds, ds) for ds in datasets]
    table = Table("fig5", "Figure 5B: best test error with more tiles, relative to (16,4,1) [best error %]",
                  header, [])
    for tiles in tilings:
        cells = ["(" + ",".join(map(str, tiles)) + ")"]
        for ds in datasets:
            runs = [r for r in curves["runs"] if r["dataset"] == ds and tuple(r["tiles"]) == tiles]
            best = min(runs, key=lambda r: r["best_test_error"]) if runs else None
            cells.append(MISSING if best is None or math.isnan(best["best_test_error"])
                         else f"{best['relative_best']:.3f} ({100 * best['best_test_error']:.2f})")
            if best is not None:
                table.records.append({"dataset": ds, "tiles": "x".join(map(str, tiles)),
                                      "best_test_error": 100 * best["best_test_error"],
                                      "relative_best": best["relative_best"], "run": Path(best["run_dir"]).name})
        table.rows.append(cells)
    table.notes = ["Single-pass test errors; the reference is the (16,4,1) run of the same recipe "
                   "(or the run with the fewest tiles)."]
    return table


def plot_similarity(table: Table, path: Path) -> None:
    """Figure 6A as grouped bars: schemes on the x axis, one bar per dataset x pooling column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = [row[0] for row in table.rows]
    cols = table.header[1:]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(schemes) + 0.4 * len(cols)), 4.2))
    width = 0.8 / max(len(cols), 1)
    for j, col in enumerate(cols):
        values = [float(row[j + 1]) if row[j + 1] not in (MISSING, "") else float("nan") for row in table.rows]
        ax.bar([i + (j - (len(cols) - 1) / 2) * width for i in range(len(schemes))], values, width, label=col)
    ax.set_xticks(range(len(schemes)), schemes, rotation=15)
    ax.set_ylabel("filter similarity (mean correlation)")
    ax.set_title("Figure 6A: similarity of the filters across tiles")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
