"""What runs before a case is part of its time: ``rapa bench conv``'s cases for one of the
paper's layers, each timed right after each other one (the README's table of predecessors,
issue 16):

    python scripts/bench_order.py [--layer conv1] [--batch 10] [--format nchw] [--rounds 40]

Every round runs the cases in a new random order (torch's generators untouched); a cell is
the fastest forward+backward (ms) of its row's case among the calls that came right after
its column's case. A fixed order (``time_interleaved(shuffle=False)``) would measure every
case in one column only.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch

from rapa.bench.conv import METHODS, PAPER_LAYERS as LAYERS, _input, _make, _step_fn
from rapa.heap import keep_heap


def predecessor_times(layer: str, batch: int, channels_last: bool, rounds: int,
                      seed: int = 0) -> dict[tuple[str, str], float]:
    """Fastest seconds of case ``b`` right after case ``a``, keyed ``(a, b)``."""
    cin, cout, size, nt, grad_in, groups, kernel = LAYERS[layer]
    dev = torch.device("cpu")
    x = _input(batch, cin, size, dev, grad_in, channels_last)
    fns = {m: _step_fn(_make(m, cin, cout, nt, dev, groups, kernel), x) for m in METHODS}
    for fn in fns.values():
        fn()
    rng = random.Random(seed)
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    prev = None
    for _ in range(rounds):
        for name in rng.sample(list(fns), len(fns)):
            t = time.perf_counter()
            fns[name]()
            if prev is not None:
                times[(prev, name)].append(time.perf_counter() - t)
            prev = name
    return {key: min(v) for key, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", choices=sorted(LAYERS), default="conv1")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--format", choices=("nchw", "nhwc"), default="nchw")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_heap()  # as the rapa commands run
    t = predecessor_times(args.layer, args.batch, args.format == "nhwc", args.rounds)
    print(f"{args.layer}, batch {args.batch}, {args.format.upper()}, {args.threads} threads: fastest ms of the "
          f"row's case right after the column's")
    print(f"{'':>10}" + "".join(f"{m:>10}" for m in METHODS))
    for b in METHODS:
        cells = "".join(f"{t[(a, b)] * 1e3:>10.3f}" if (a, b) in t else f"{'-':>10}" for a in METHODS)
        print(f"{b:>10}{cells}")


if __name__ == "__main__":
    main()
