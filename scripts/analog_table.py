"""The README's analog table from the run directories of ``scripts/analog-fmnist.sh``.

    python scripts/analog_table.py runs/analog        # Markdown on stdout
    python scripts/analog_table.py runs/a runs/b ...  # each folder's table, then the runs side
                                                      # by side (e.g. seeds: SEED=N analog-fmnist.sh)

Reads each run's ``metrics.csv`` and ``summary.json`` (fractions) and prints errors in %,
with 95% intervals, and whether untiled and random rank the same way in FP and RPU; where
an RPU run has ``arrays.json``, what its arrays did in each epoch.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

NETS = (("none", "untiled"), ("random", "random (16,4,1)"))


def _curve(folder: Path) -> list[float]:
    """Test error in % after every epoch so far (empty: no epoch finished)."""
    metrics = folder / "metrics.csv"
    if not metrics.is_file():
        return []
    with open(metrics) as f:
        return [100 * float(r["test_error"]) for r in csv.DictReader(f) if r["test_error"] not in ("", "nan")]


def _run(folder: Path) -> tuple[list[float], dict] | None:
    """A finished run's curve and summary; None while it runs."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    return _curve(folder), json.loads(summary.read_text())


def _epochs(folder: Path) -> str:
    """'k of E epochs' of a run that has not finished."""
    try:
        total = json.loads((folder / "config.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        total = "?"
    return f"{len(_curve(folder))} of {total} epochs"


def _interval(run: tuple[list[float], dict]) -> str:
    """The final single-pass error's 95% Wilson interval in % (the test images as trials)."""
    from rapa.modern import wilson

    s = run[1]
    n = int(s["test_images"])
    lo, hi = wilson(round(s["final_test_error"] * n), n)
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _gap(fp: dict, rpu: dict) -> str:
    """RPU - FP in pp with a 95% interval: two independent binomials (normal approximation;
    conservative, as both nets are scored on the same test images)."""
    a, b, n = fp["final_test_error"], rpu["final_test_error"], int(fp["test_images"])
    half = 1.96 * ((a * (1 - a) + b * (1 - b)) / n) ** 0.5
    return f"{100 * (b - a):+.2f} [{100 * (b - a - half):+.1f}, {100 * (b - a + half):+.1f}]"


def ranking(out: Path) -> str:
    """Whether untiled vs random rank the same way in FP and RPU (final single pass)."""
    absent = [label for key, label in NETS if not any((out / f"fmnist-{key}-{kind}").is_dir()
                                                      for kind in ("fp", "rpu-baseline"))]
    if absent:
        return f"ranking: needs both nets ({', '.join(absent)}: no runs in this folder)"
    runs = {(key, kind): _run(out / f"fmnist-{key}-{kind}") for key, _ in NETS for kind in ("fp", "rpu-baseline")}
    if any(r is None for r in runs.values()):
        return "ranking: not every run has finished"
    err = {k: r[1]["final_test_error"] for k, r in runs.items()}  # type: ignore[index]
    fp = "untiled" if err[("none", "fp")] < err[("random", "fp")] else "random"
    rpu = "untiled" if err[("none", "rpu-baseline")] < err[("random", "rpu-baseline")] else "random"
    gap_fp = 100 * (err[("random", "fp")] - err[("none", "fp")])
    gap_rpu = 100 * (err[("random", "rpu-baseline")] - err[("none", "rpu-baseline")])
    same = "the same" if fp == rpu else "NOT the same"
    return (f"ranking: {same} in FP and RPU (better: {fp} in FP, {rpu} in RPU; random - untiled "
            f"{gap_fp:+.2f} pp in FP, {gap_rpu:+.2f} pp in RPU)")


def table(out: Path) -> str:
    """Markdown rows: per net, FP and RPU test error per epoch, final single pass with its 95%
    interval (9-vote), the gap with its interval."""
    lines = ["| net | FP: test error per epoch | FP final [95% CI] (9-vote) | RPU: test error per epoch "
             "| RPU final [95% CI] (9-vote) | RPU - FP (pp) [95% CI] | RPU img/s |",
             "|---|---|---|---|---|---|---|"]
    for key, label in NETS:
        folders = out / f"fmnist-{key}-fp", out / f"fmnist-{key}-rpu-baseline"
        if not any(f.is_dir() for f in folders):  # this net was not run here (e.g. `... short OUT random`)
            continue
        fp, rpu = _run(folders[0]), _run(folders[1])
        config = folders[1] / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        notes = [", ".join(saved["analog_options"])] if saved.get("analog_options") else []
        if saved.get("digital_layers"):
            notes.append(f"digital {', '.join(saved['digital_layers'])}")
        if saved.get("layer_lr_scale"):
            notes.append(f"rates x {', '.join(saved['layer_lr_scale'])}")
        cells = [label + (f" (RPU: {'; '.join(notes)})" if notes else "")]
        for run, folder in zip((fp, rpu), folders):
            if run is None:  # running (or not started): the curve so far
                curve = _curve(folder)
                cells += [", ".join(f"{e:.1f}" for e in curve) or "-",
                          f"running ({_epochs(folder)})" if folder.is_dir() else "-"]
                continue
            curve, s = run
            cells += [", ".join(f"{e:.1f}" for e in curve),
                      f"{100 * s['final_test_error']:.2f} {_interval(run)} ({100 * s['vote_test_error']:.2f})"]
        if fp and rpu:
            cells.append(_gap(fp[1], rpu[1]))
            cells.append(f"{rpu[1]['images_per_s']:.0f}")
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epoch_gaps(out: Path) -> str:
    """RPU - FP test error after each epoch that both runs of a net have finished (pp): the
    comparison that a run still going already allows, as both follow the same schedule."""
    lines = []
    for key, label in NETS:
        fp, rpu = _curve(out / f"fmnist-{key}-fp"), _curve(out / f"fmnist-{key}-rpu-baseline")
        if fp and rpu:
            gaps = ", ".join(f"{r - f:+.1f}" for f, r in zip(fp, rpu))
            lines.append(f"RPU - FP after each epoch, {label}: {gaps} pp")
    return "\n".join(lines)


def arrays(out: Path) -> str:
    """From each RPU run's ``arrays.json`` (runs made since it exists): per layer and epoch,
    the % of pulsed updates cut short by the pulse train's length and the % of weights at
    their device's bound after the epoch; then, per tiled layer, the similarity of its
    replicas after each epoch (SPEC §4, runs since arrays.json records it)."""
    lines = []
    for key, label in NETS:
        path = out / f"fmnist-{key}-rpu-baseline" / "arrays.json"
        if not path.is_file():
            continue
        records = json.loads(path.read_text()).get("epochs", [])
        if not records:
            continue
        lines += [f"{label}, per epoch: updates cut short (%) / weights at a bound (%)", "",
                  "| layer | " + " | ".join(f"epoch {r['epoch']}" for r in records) + " |",
                  "|---|" + "---|" * len(records)]
        for layer in records[0]["layers"]:
            cells = [f"{100 * r.get('updates', {}).get(layer, {}).get('saturated', float('nan')):.2f} / "
                     f"{100 * r['layers'][layer]['at_bound']:.2f}" for r in records]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        for layer in records[-1].get("similarity", {}):  # runs since arrays.json records it
            cells = [f"{r['similarity'][layer]:.3f}" if layer in r.get("similarity", {}) else "-" for r in records]
            lines.append(f"| {layer}: replicas' similarity | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
"""Student's t, two-sided 95%, by degrees of freedom (runs - 1)."""


def across(folders: list[Path]) -> str:
    """Per net, the final errors of every folder's FP and RPU runs and the gap RPU - FP:
    mean, standard deviation and the 95% t-interval of the mean gap over the folders whose
    pair has finished."""
    lines = ["| net | runs | FP final (%) | RPU final (%) | RPU - FP (pp) | mean gap [95% CI] (sd) |",
             "|---|---|---|---|---|---|"]
    for key, label in NETS:
        pairs = [(_run(f / f"fmnist-{key}-fp"), _run(f / f"fmnist-{key}-rpu-baseline")) for f in folders]
        done = [(fp[1]["final_test_error"], rpu[1]["final_test_error"]) for fp, rpu in pairs if fp and rpu]
        if not done:
            continue
        gaps = [100 * (b - a) for a, b in done]
        mean = sum(gaps) / len(gaps)
        if len(gaps) > 1:
            sd = (sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) ** 0.5
            half = T975.get(len(gaps) - 1, 1.96) * sd / len(gaps) ** 0.5
            summary = f"{mean:+.2f} [{mean - half:+.1f}, {mean + half:+.1f}] ({sd:.2f})"
        else:
            summary = f"{mean:+.2f} (one run)"
        lines.append(f"| {label} | {len(done)} | " + ", ".join(f"{100 * a:.2f}" for a, _ in done) + " | "
                     + ", ".join(f"{100 * b:.2f}" for _, b in done) + " | "
                     + ", ".join(f"{g:+.2f}" for g in gaps) + f" | {summary} |")
    return "\n".join(lines)


if __name__ == "__main__":
    paths = [Path(a) for a in sys.argv[1:]]
    if not paths or not all(p.is_dir() for p in paths):
        print("usage: python scripts/analog_table.py RUNS_FOLDER [RUNS_FOLDER ...]", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        if len(paths) > 1:
            print(f"{path}:\n")
        print(table(path))
        print()
        print(ranking(path))
        gaps = epoch_gaps(path)
        if gaps:
            print()
            print(gaps)
        state = arrays(path)
        if state:
            print()
            print(state)
        print()
    if len(paths) > 1:
        print(across(paths))
