"""The README's analog table from the run directories of ``scripts/analog-fmnist.sh``.

    python scripts/analog_table.py runs/analog        # Markdown on stdout

Reads each run's ``metrics.csv`` and ``summary.json`` (fractions) and prints errors in %.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

NETS = (("none", "untiled"), ("random", "random (16,4,1)"))


def _run(folder: Path) -> tuple[list[float], dict] | None:
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    with open(folder / "metrics.csv") as f:
        curve = [100 * float(r["test_error"]) for r in csv.DictReader(f) if r["test_error"] not in ("", "nan")]
    return curve, json.loads(summary.read_text())


def table(out: Path) -> str:
    """Markdown rows: per net, FP and RPU test error per epoch, final single pass (9-vote), gap."""
    lines = ["| net | FP: test error per epoch | FP final (9-vote) | RPU: test error per epoch "
             "| RPU final (9-vote) | RPU - FP (pp) | RPU img/s |",
             "|---|---|---|---|---|---|---|"]
    for key, label in NETS:
        fp, rpu = _run(out / f"fmnist-{key}-fp"), _run(out / f"fmnist-{key}-rpu-baseline")
        cells = [label]
        for run in (fp, rpu):
            if run is None:
                cells += ["-", "-"]
                continue
            curve, s = run
            cells += [", ".join(f"{e:.1f}" for e in curve),
                      f"{100 * s['final_test_error']:.2f} ({100 * s['vote_test_error']:.2f})"]
        if fp and rpu:
            cells.append(f"{100 * (rpu[1]['final_test_error'] - fp[1]['final_test_error']):+.2f}")
            cells.append(f"{rpu[1]['images_per_s']:.0f}")
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python scripts/analog_table.py RUNS_FOLDER", file=sys.stderr)
        sys.exit(2)
    print(table(Path(sys.argv[1])))
