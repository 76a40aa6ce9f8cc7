"""REPORT.md of a reproduction battery, from its small files alone (no checkpoint needed).

A battery's results tree (``results/fmnist``) holds ``battery.json`` (the command, rapa's
commit, the analysis settings, the wall time) and ``runs/NAME/`` with each finished run's
``config.json``, ``metrics.csv``, ``summary.json`` and analysis caches (``voting.json``,
``similarity.json``, ``reduce.json``, ``attack.json``). :func:`write_battery_report` turns
them into ``REPORT.md`` (the claims with verdicts and rules, then tables with the mean and
95% interval over seeds), ``claims.json`` and the figures in ``report/``: learning curves
per scheme with bands, and the robustness curves with bands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rapa.analysis.attack import accuracy_at
from rapa.errors import RapaError
from rapa.rundir import read_metrics
from rapa.sweep import claims as C
from rapa.sweep.analyses import Analyses
from rapa.sweep.evidence import (ALL_ROWS, COMPARISON_DB, TILED, chance_notes, claims_json, evaluate_claims,
                                 per_seed, recipe_text)
from rapa.sweep.runs import RunRecord, collect_runs
from rapa.sweep.stats import seed_stats

__all__ = ["MANIFEST", "learning_curves", "read_manifest", "write_battery_report"]

MANIFEST = "battery.json"
"""The battery's description in its results tree."""


def read_manifest(results: str | Path) -> dict[str, Any] | None:
    """``results/battery.json`` (None if absent or unreadable)."""
    try:
        value = json.loads((Path(results) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _pct(summary: Mapping[str, Any] | None, key: str) -> float | None:
    v = None if summary is None else summary.get(key)
    return None if v is None else 100.0 * float(v)


def _cell(values: Mapping[int, float], digits: int = 2) -> str:
    return seed_stats(values).text(digits)


def _read_metrics(run_dir: Path) -> list[dict[str, float]]:
    try:
        return read_metrics(run_dir)
    except RapaError:
        return []


def learning_curves(groups: Mapping[str, Mapping[int, RunRecord]]) -> dict[str, dict[str, list[float]]]:
    """Per row: ``epoch``, ``mean``, ``lo``, ``hi`` of the test error (%) over seeds per epoch."""
    out = {}
    for row, runs in groups.items():
        per_epoch: dict[int, dict[int, float]] = {}
        for seed, rec in runs.items():
            for m in _read_metrics(rec.run_dir):
                if not math.isnan(m.get("test_error", math.nan)):
                    per_epoch.setdefault(int(m["epoch"]), {})[seed] = 100.0 * m["test_error"]
        epochs = sorted(per_epoch)
        stats = [seed_stats(per_epoch[e]) for e in epochs]
        out[row] = {"epoch": [float(e) for e in epochs], "mean": [s.mean for s in stats],
                    "lo": [s.lo if s.n > 1 else s.mean for s in stats], "hi": [s.hi if s.n > 1 else s.mean
                                                                              for s in stats]}
    return out


def _plot_bands(series: Mapping[str, Mapping[str, list[float]]], x: str, path: Path, xlabel: str, ylabel: str,
                title: str, vline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for j, (label, s) in enumerate(series.items()):
        if not s[x]:
            continue
        style = "--" if "EOT" in label else "-"
        ax.plot(s[x], s["mean"], style, color=f"C{j % 10}", marker="o", ms=3, label=label)
        ax.fill_between(s[x], [max(v, 0.0) for v in s["lo"]], [min(v, 100.0) for v in s["hi"]],
                        color=f"C{j % 10}", alpha=0.18, lw=0)  # percentages: the band clipped to 0-100
    if vline is not None:
        ax.axvline(vline, color="0.5", lw=0.8)
    ax.set_ylim(bottom=0, top=min(100.0, ax.get_ylim()[1]) + 1)
    if x == "epoch":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: str = "") -> list[str]:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + ([""] + [notes] if notes else []) + [""]


def _table1(groups: Mapping[str, Mapping[int, RunRecord]], metric: str) -> list[str]:
    rows = []
    for row in [r for r in ALL_ROWS if r in groups] + sorted(set(groups) - set(ALL_ROWS)):
        runs = groups[row]
        col = {k: {s: v for s, r in runs.items() if (v := _pct(r.summary, k)) is not None}
               for k in ("best5_test_error", "best5_train_error", "final_test_error", "vote_test_error")}
        random_eval = row == "random" or (row.startswith("random ") and not row.startswith("random fixed"))
        chance = chance_notes(groups, [row], metric)
        rows.append([row, _cell(col["best5_test_error"]), _cell(col["best5_train_error"]),
                     _cell(col["final_test_error"]), _cell(col["vote_test_error"]) if random_eval else "",
                     str(len(runs)), ", ".join(c.replace(row + " ", "", 1) for c in chance)])
    return _table("Table 1: test error [%], mean ± 95% interval over seeds",
                  ["scheme", "best-5 test error", "train error (same epochs)", "final net, one pass",
                   "final net, 9-vote", "seeds", "near chance"], rows,
                  "Best-5: the best test error averaged over 5 consecutive epochs (the paper's figure; train error of "
                  "the same epochs). One pass and 9-vote: the final net of each seed on the whole test set, both on "
                  "the same nets (voting only where evaluation is random). ±: half-width of the 95% Student-t "
                  "interval over seeds. Near chance: seeds whose net did not beat the trivial classifier (always the "
                  f"most frequent class) by 10 pp in the {C.METRICS[metric]}.")


def _analysis_tables(groups: Mapping[str, Mapping[int, RunRecord]], analyses: Analyses,
                     plot_dir: Path) -> tuple[list[str], list[str]]:
    lines: list[str] = []
    sim_rows, red_rows = [], []
    for row in TILED:
        runs = groups.get(row, {})
        sims = {s: v["overall"] for s, r in runs.items() if (v := analyses.similarity(r)) is not None}
        reds = {s: v for s, r in runs.items() if (v := analyses.reduction(r)) is not None}
        if sims:
            sim_rows.append([row, _cell(sims, 3), str(len(sims))])
        if reds:
            methods = sorted({str(v.get("best_method")) for v in reds.values()})
            red_rows.append([row, _cell({s: v["best_error"] for s, v in reds.items()}),
                             _cell({s: v["tiled_error"] for s, v in reds.items() if v.get("tiled_error") is not None}),
                             ", ".join(methods), str(len(reds))])
    if sim_rows:
        lines += _table("Figure 6A: similarity of the filters across tiles (mean correlation), mean ± 95% interval",
                        ["scheme", "similarity", "seeds"], sim_rows,
                        "Pearson correlation of a channel's filter between all pairs of tiles, averaged over channels, "
                        "then over the tiled layers (SPEC §4); 1: identical filters.")
    if red_rows:
        lines += _table("Table 3: test error [%] after reduction to one kernel per layer, mean ± 95% interval",
                        ["scheme", "reduced (best method)", "tiled net, one pass", "methods chosen", "seeds"],
                        red_rows, "Per channel one tile's filter, chosen by the best of the methods of SPEC §4.")
    figures: list[str] = []
    nets = {"random": ("fgsm", "fgsm_eot"), "no tiling": ("fgsm",), "no tiling enlarged": ("fgsm",)}
    curves: dict[str, dict[str, list[float]]] = {}
    snrs: list[float] = []
    for row, attacks in nets.items():
        got = {s: c for s, r in groups.get(row, {}).items() if (c := analyses.robustness(r)) is not None}
        if not got:
            continue
        snrs = sorted({float(x) for c in got.values() for x in c["snr_db"]})
        for a in attacks:
            per = [seed_stats({s: accuracy_at(c["snr_db"], c["accuracy"][a], x) for s, c in got.items()})
                   for x in snrs]
            label = f"{row}, {'EOT-FGSM' if a == 'fgsm_eot' else 'FGSM'}"
            curves[label] = {"snr": snrs, "mean": [p.mean for p in per], "lo": [p.lo if p.n > 1 else p.mean
                                                                              for p in per],
                             "hi": [p.hi if p.n > 1 else p.mean for p in per], "text": [p.text(1) for p in per]}
    if curves:
        header = ["SNR (dB)"] + list(curves)
        rows = [[f"{x:g}" + (" (paper's point)" if x == COMPARISON_DB else "")] + [c["text"][i]
                                                                                  for c in curves.values()]
                for i, x in enumerate(snrs)]
        lines += _table("Figure 7: accuracy [%] under attack by SNR (pixel space), mean ± 95% interval over seeds",
                        header, rows, "Accuracy over the test images each net classified correctly; SNR = "
                        "20 log10(||x|| / ||delta||) on the pixel-space images. The claim is scored at 33 dB.")
        path = plot_dir / "fig7.png"
        _plot_bands(curves, "snr", path, "SNR (dB, pixel space)", "accuracy on correct images [%]",
                    "Robustness to FGSM / EOT-FGSM (bands: 95% over seeds)", COMPARISON_DB)
        figures.append(path.name)
    return lines, figures


def write_battery_report(results: str | Path, log: Callable[[str], None] | None = None,
                         analyses: Analyses | None = None) -> Path:
    """Write ``REPORT.md``, ``claims.json`` and ``report/*.png`` of the battery whose results
    tree is ``results`` (its ``runs/`` and ``battery.json``) from those files alone; returns REPORT.md."""
    results = Path(results)
    say = log or (lambda msg: None)
    manifest = read_manifest(results) or {}
    opts = manifest.get("analyses") or {}
    analyses = analyses or Analyses(compute=False, attack_limit=opts.get("attack_limit"), eot=opts.get("eot", 8),
                                    snrs=opts.get("snrs"), device="cpu")
    metric = manifest.get("error_metric") or "best5_test_error"
    runs_dir = results / "runs"
    records = collect_runs(runs_dir) if runs_dir.is_dir() else []
    groups = per_seed(records, metric)
    recipe = recipe_text(records)
    claims = evaluate_claims(records, analyses, recipe, metric=metric)
    plot_dir = results / "report"
    say(f"report: {sum(r.finished for r in records)} finished runs in {runs_dir}")

    curves = learning_curves({row: groups[row] for row in ALL_ROWS if row in groups})
    figures = []
    if any(c["epoch"] for c in curves.values()):
        _plot_bands({k: {"epoch": v["epoch"], "mean": v["mean"], "lo": v["lo"], "hi": v["hi"]}
                     for k, v in curves.items()}, "epoch", plot_dir / "curves.png", "epoch",
                    "test error [%] (one pass)", "Learning curves (bands: 95% over seeds)")
        figures.append("curves.png")
    analysis_lines, more = _analysis_tables(groups, analyses, plot_dir)
    figures += more

    total = manifest.get("runs")
    seeds = sorted({s for g in groups.values() for s in g})
    wall = manifest.get("wall_seconds")
    head = [f"# RAPA-ConvNets: reproduction battery `{manifest.get('experiment', '?')}`", "",
            f"- Command: `{manifest.get('command', '?')}`",
            f"- rapa commit: `{manifest.get('commit', '?')}`" + (" (with uncommitted changes)"
                                                                  if manifest.get("dirty") else ""),
            f"- Wall time: " + ("unfinished" if wall is None else f"{wall / 60:.0f} min")
            + (f" (started {manifest['started']})" if manifest.get("started") else ""),
            f"- Runs: {sum(r.finished for r in records)} finished" + (f" of {total}" if total else "")
            + f"; seeds {', '.join(map(str, seeds)) or '–'} (the same for every scheme)",
            f"- Recipe as run: {recipe or '–'}"
            + ("; budget options: " + ", ".join(f"{k}={v}" for k, v in manifest["budget"].items())
               if manifest.get("budget") else ""),
            f"- Experiment: {manifest.get('description') or manifest.get('experiment', '?')}",
            f"- Analyses: voting and attacks on the first {opts.get('attack_limit') or 'all'} test images, EOT with "
            f"{opts.get('eot', 8)} draws, SNRs {', '.join(f'{s:g}' for s in opts.get('snrs') or []) or 'default'} dB "
            "(pixel space)",
            f"- Schemes compared by: the {C.METRICS[metric]}" + (
                " (with a few epochs the paper's 5-epoch window would reach back to the warm-up and the epochs before "
                "the rate's step; Table 1 shows both)" if metric == "final_test_error" else ""), ""]
    lines = head + ["## Claims of the paper and what was measured", "",
                    "| # | the paper | measured here | seeds | verdict | why |", "|---|---|---|---:|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c.paper} | {c.measured} | {c.n_seeds} | **{c.verdict_text}** | {c.reason} |")
    lines += ["", "Verdict rules (every scheme trained with the same seeds; intervals are 95% Student-t intervals "
              "over the seeds of the per-seed differences; a claim resting on a net whose test error is within "
              "10 pp of the trivial classifier's, or on fewer than 2 seeds, is inconclusive):", ""]
    lines += [f"{i}. {c.key}: {c.rule}." for i, c in enumerate(claims, 1)]
    lines += ["", "## Tables and figures", ""] + _table1(groups, metric)
    if "curves.png" in figures:
        lines += ["![learning curves](report/curves.png)", ""]
    lines += analysis_lines
    if "fig7.png" in figures:
        lines += ["![robustness](report/fig7.png)", ""]
    failed = [r for r in records if r.status == "failed"]
    lines += [f"- failed: `{r.name}`: {r.error}" for r in failed]
    path = results / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    (results / "claims.json").write_text(json.dumps(claims_json(claims), indent=1) + "\n")
    return path
