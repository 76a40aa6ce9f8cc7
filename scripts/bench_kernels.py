"""One tiled layer's three kernels against oneDNN's, one at a time (the README's "kernel by
kernel" figures of issue 16):

    python scripts/bench_kernels.py [--layer conv2] [--batch 128] [--threads 2] [--format nhwc]

For the paper's conv1, conv2 or conv3 (random scheme, its tiles) it times, round-robin in one
process and keeping each case's fastest repetition, the forward (no autograd graph), the input
gradient alone and the weight+bias gradient alone of ``rapa.TiledConv2d`` and of the
``nn.Conv2d`` it was made from, and prints the ratios. Times, not targets: the targets are
``rapa bench conv``'s.
"""

from __future__ import annotations

import argparse
import time

import torch

import rapa
from rapa import native
from rapa.bench.conv import PAPER_LAYERS as LAYERS  # conv1..conv3 as `rapa bench conv` measures them


def kernel_times(layer: str, batch: int, channels_last: bool, repeats: int) -> dict[str, tuple[float, float]]:
    """Seconds of (rapa, nn.Conv2d) for "forward", "input gradient" and "weight gradient"."""
    cin, cout, size, nt, _, _, kernel = LAYERS[layer]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    tiled = rapa.TiledConv2d.from_conv2d(conv, nt, "random")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=fmt)
    g = torch.randn(batch, cout, size, size).contiguous(memory_format=fmt)
    cases = {}
    for name, module in (("rapa", tiled), ("conv2d", conv)):
        def forward(m=module):
            with torch.no_grad():
                m(x)
        xg = x.clone().requires_grad_(True)
        for p in module.parameters():
            p.requires_grad_(False)
        y_x = module(xg)  # a graph whose backward computes the input gradient only
        for p in module.parameters():
            p.requires_grad_(True)
        y_w = module(x)  # the weight and bias gradients only
        params = list(module.parameters())
        cases[name] = {"forward": forward,
                       "input gradient": lambda y=y_x, xg=xg: torch.autograd.grad(y, [xg], g, retain_graph=True),
                       "weight gradient": lambda y=y_w, ps=params: torch.autograd.grad(y, ps, g, retain_graph=True)}
    best = {(n, k): float("inf") for n in cases for k in cases[n]}
    for fns in cases.values():  # warm-up: kernels built, buffers sized
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for n, fns in cases.items():
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                best[n, k] = min(best[n, k], time.perf_counter() - t)
    return {k: (best["rapa", k], best["conv2d", k]) for k in cases["rapa"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", choices=sorted(LAYERS), default="conv2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--format", choices=("nhwc", "nchw"), default="nhwc")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = kernel_times(args.layer, args.batch, args.format == "nhwc", args.repeats)
    print(f"{args.layer}, batch {args.batch}, {args.format.upper()}, {args.threads} threads "
          f"({native.describe()}): ms, fastest of {args.repeats}")
    for k, (r, c) in times.items():
        print(f"{k:16s} rapa {r * 1e3:8.3f}  nn.Conv2d {c * 1e3:8.3f}  ratio {r / c:.3f}")
    r, c = (sum(t[i] for t in times.values()) for i in (0, 1))
    print(f"{'all three':16s} rapa {r * 1e3:8.3f}  nn.Conv2d {c * 1e3:8.3f}  ratio {r / c:.3f}")


if __name__ == "__main__":
    main()
