"""The README's benchmark tables from the files of ``scripts/bench-all.sh``.

    python scripts/bench_table.py results/bench        # Markdown on stdout
    python scripts/bench_table.py results/bench --median conv.json conv-run4.json ...

Reads ``conv.json`` (``rapa bench conv --json``: both memory formats) and ``train-2t.json`` /
``train-1t.json`` (``rapa bench train --json``, the first with ``--profile``). With
``--median`` and several ``rapa bench conv`` files of that folder, the README's conv table
instead: per format and batch each paper layer's median ratio over the runs and the median
of the runs' geomeans, with their ranges.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def conv_table(cases: list[dict]) -> str:
    """Per format and batch: the paper's three layers (random / conv2d, PyTorch path, memory),
    their geomean and worst layer; then the grouped layers."""
    lines = ["| format | batch | layer | nt | random | random-pt | memory (random) |",
             "|---|---|---|---|---|---|---|"]
    grouped = []
    for fmt in dict.fromkeys(c["memory_format"] for c in cases):
        for batch in sorted({c["batch"] for c in cases if c["memory_format"] == fmt}, reverse=True):
            paper = [c for c in cases if c["memory_format"] == fmt and c["batch"] == batch and c["groups"] == 1]
            ratios = []
            for c in paper:
                s, m = c["seconds"], c["peak_bytes"]
                r = s["random"] / s["conv2d"]
                ratios.append(r)
                mem = f"{m['random'] / max(m['conv2d'], 1):.2f}x" if m else "-"
                lines.append(f"| {fmt} | {batch} | {c['shape']} | {c['nt']} | {r:.2f}x | "
                             f"{s['random-pt'] / s['conv2d']:.2f}x | {mem} |")
            if ratios:
                lines.append(f"| {fmt} | {batch} | **geomean** (worst) | | **{_geomean(ratios):.2f}x** "
                             f"({max(ratios):.2f}x) | {_geomean([c['seconds']['random-pt'] / c['seconds']['conv2d'] for c in paper]):.2f}x | |")
            grouped += [c for c in cases if c["memory_format"] == fmt and c["batch"] == batch and c["groups"] > 1]
    lines += ["", "| format | batch | layer | random | random-pt | naive / random |", "|---|---|---|---|---|---|"]
    for c in grouped:
        s = c["seconds"]
        lines.append(f"| {c['memory_format']} | {c['batch']} | {c['shape']} | {s['random'] / s['conv2d']:.2f}x | "
                     f"{s['random-pt'] / s['conv2d']:.2f}x | {s['naive'] / s['random']:.1f}x |")
    return "\n".join(lines)


def conv_median_table(runs: list[list[dict]]) -> str:
    """Per format and batch over several runs of ``rapa bench conv``: each paper layer's median
    random / conv2d ratio (range) and the median (range) of the runs' geomeans. The paper's
    layers are the ungrouped ones, as in :func:`conv_table`, in the first run's order."""
    first = runs[0]
    layers = list(dict.fromkeys((c["shape"], c["nt"]) for c in first if c["groups"] == 1))
    lines = ["| format | batch | " + " | ".join(f"{shape} nt={nt}" for shape, nt in layers) + " | geomean |",
             "|---|---|" + "---|" * (len(layers) + 1)]
    for fmt in dict.fromkeys(c["memory_format"] for c in first):
        for batch in sorted({c["batch"] for c in first if c["memory_format"] == fmt}, reverse=True):
            per_run = []  # each run's ratios of the paper's layers, in the order of `layers`
            for cases in runs:
                by_shape = {c["shape"]: c["seconds"] for c in cases
                            if c["memory_format"] == fmt and c["batch"] == batch and c["groups"] == 1}
                per_run.append([by_shape[shape]["random"] / by_shape[shape]["conv2d"] for shape, _ in layers])
            cells = []
            for i in range(len(layers)):
                col = [r[i] for r in per_run]
                cells.append(f"{statistics.median(col):.2f}x ({min(col):.2f}-{max(col):.2f})")
            gms = [_geomean(r) for r in per_run]
            cells.append(f"**{statistics.median(gms):.2f}x** ({min(gms):.2f}-{max(gms):.2f})")
            lines.append(f"| {fmt} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_table(runs: dict[str, list[dict]]) -> str:
    """Images/s of both nets and the slowdown, per thread count and batch."""
    lines = ["| threads | batch | untiled img/s | random (16,4,1) img/s | slowdown | PyTorch path slowdown |",
             "|---|---|---|---|---|---|"]
    for rows in runs.values():
        for r in rows:
            ips = r["images_per_s"]
            pt = ips.get("PyTorch path")
            lines.append(f"| {r['threads']} | {r['batch']} | {ips['untiled']:.0f} | {ips['random 16,4,1']:.0f} | "
                         f"**{ips['untiled'] / ips['random 16,4,1']:.2f}x** | "
                         + (f"{ips['untiled'] / pt:.2f}x |" if pt else "- |"))
    return "\n".join(lines)


def profile_table(profiles: list[dict]) -> str:
    """Per batch: each part of a step of both nets (ms per step) and the difference."""
    lines = ["| batch | part | untiled ms | random ms | difference |", "|---|---|---|---|---|"]
    for p in profiles:
        a, b = p["parts_ms"]["untiled"], p["parts_ms"]["random 16,4,1"]
        for part in list(a) + [k for k in b if k not in a]:  # the order of rapa.bench.train.PARTS
            lines.append(f"| {p['batch']} | {part} | {a.get(part, 0):.3f} | {b.get(part, 0):.3f} | "
                         f"{b.get(part, 0) - a.get(part, 0):+.3f} |")
        lines.append(f"| {p['batch']} | assignment draws (in the random net's convolution) | | {p['draw_ms']:.3f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    median = args[2:] if len(args) > 2 and args[1] == "--median" else None
    if not args or not Path(args[0]).is_dir() or (len(args) > 1 and not median):
        print("usage: python scripts/bench_table.py BENCH_FOLDER [--median CONV_JSON ...]", file=sys.stderr)
        sys.exit(2)
    folder = Path(args[0])
    if median:
        missing = [name for name in median if not (folder / name).is_file()]
        if missing:
            print(f"bench_table: no {missing[0]} in {folder}: name rapa bench conv --json files there", file=sys.stderr)
            sys.exit(2)
        print(conv_median_table([json.loads((folder / name).read_text()) for name in median]))
        sys.exit(0)
    if (folder / "conv.json").is_file():
        print(conv_table(json.loads((folder / "conv.json").read_text())) + "\n")
    runs = {}
    profiles = []
    for name in ("train-2t.json", "train-1t.json"):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            runs[name] = data["throughput"] if isinstance(data, dict) else data
            profiles += data.get("profiles", []) if isinstance(data, dict) else []
    if runs:
        print(train_table(runs) + "\n")
    if profiles:
        print(profile_table(profiles))
