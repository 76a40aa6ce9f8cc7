"""Benchmark of one RAPA conv layer against ``nn.Conv2d`` and the naive method.

For the paper's three layer shapes, a depthwise layer (3x3, ``groups = channels``, as in
MobileNets) and a grouped one (3x3, 4 groups) it measures forward+backward time and peak memory of
``nn.Conv2d``, ``TiledConv2d`` (``random`` and ``none``) and the naive method, which
convolves with all ``nt`` kernels and picks one output per pixel (``nt`` times the MACs).
On the CPU, ``random`` runs on the native kernels where they build (:mod:`rapa.native`);
``random-pt`` is the same layer on the pure-PyTorch path.
The first layer's input does not require a gradient (it is the image), as in a network.
CPU peak memory is the growth of the resident set during one forward+backward (gradients
included), measured in a fresh subprocess per case; on CUDA it is ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from rapa import native
from rapa.bench.common import geomean, resolve_device, sync, time_interleaved
from rapa.functional import tiled_conv2d_dense
from rapa.ops import native_op
from rapa.tiled_conv import TiledConv2d

# (cin, cout, size, nt, input requires grad, groups, kernel): conv1, conv2, conv3 of the
# paper's net (5x5, padding 2), then a depthwise and a grouped 3x3 layer (padding 1)
PAPER_SHAPES: tuple[tuple[int, int, int, int, bool, int, int], ...] = (
    (3, 32, 32, 16, False, 1, 5),
    (32, 32, 16, 4, True, 1, 5),
    (32, 64, 8, 1, True, 1, 5),
)
PAPER_LAYERS: dict[str, tuple[int, int, int, int, bool, int, int]] = {
    f"conv{i + 1}": shape for i, shape in enumerate(PAPER_SHAPES)}
"""The paper's layers by name (``conv1``..``conv3``), for the kernel and order scripts."""
GROUPED_SHAPES: tuple[tuple[int, int, int, int, bool, int, int], ...] = (
    (64, 64, 16, 4, True, 64, 3),
    (32, 32, 16, 4, True, 4, 3),
)
METHODS: tuple[str, ...] = ("conv2d", "none", "random", "random-pt", "naive")


FORMATS: tuple[str, ...] = ("NCHW", "NHWC")
"""Memory formats of the inputs: NCHW (as a user passes them) and channels-last."""

# targets (issue "within a few percent of nn.Conv2d"): random / conv2d, forward + backward
TARGET_GEOMEAN = 1.05  # geomean over the paper's three layers, each batch size and format
TARGET_LAYER = 1.10  # every one of those layers
TARGET_MEMORY = 1.10  # peak memory of the tiled layer over nn.Conv2d's


@dataclass
class ConvCase:
    """One measured (shape, batch, memory format) case: seconds and peak bytes per method."""

    shape: str
    batch: int
    nt: int
    seconds: dict[str, float]
    peak_bytes: dict[str, int]
    groups: int = 1
    memory_format: str = "NCHW"


def _make(method: str, cin: int, cout: int, nt: int, device: torch.device, groups: int = 1, kernel: int = 5):
    """A forward+backward closure for ``method`` and the tensors it keeps alive."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, device=device)
    if method == "conv2d":
        return conv
    if method == "none":
        return TiledConv2d.from_conv2d(conv, 1, "none")
    layer = TiledConv2d.from_conv2d(conv, nt, "random")
    if method == "random":
        return layer
    if method == "random-pt":  # the forward picks the implementation, and so the backward
        def pytorch_path(x):
            with native.disabled():
                return layer(x)

        pytorch_path.parameters = layer.parameters  # type: ignore[attr-defined]
        return pytorch_path

    def naive(x):
        s = layer.tile_map(x)  # (N, np): same draw as the layer would use
        return tiled_conv2d_dense(x, layer.weight, layer.bias, s, padding=kernel // 2, groups=groups)

    naive.parameters = layer.parameters  # type: ignore[attr-defined]
    return naive


def _input(batch: int, cin: int, size: int, device: torch.device, grad: bool, channels_last: bool):
    x = torch.randn(batch, cin, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _step_fn(module, x):
    def step():
        y = module(x)
        y.backward(torch.ones_like(y))
    return step


def measure_peak(method: str, shape: tuple, batch: int, device: torch.device,
                 channels_last: bool = False) -> int:
    """Peak extra memory (bytes) of one forward+backward of ``method``."""
    cin, cout, size, nt, grad_in, groups, kernel = shape
    if device.type == "cuda":
        module = _make(method, cin, cout, nt, device, groups, kernel)
        x = _input(batch, cin, size, device, grad_in, channels_last)
        step = _step_fn(module, x)
        step()  # allocator warm-up
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    code = ("import sys, json; from rapa.bench.conv import _peak_child; "
            f"print(json.dumps(_peak_child({method!r}, {tuple(shape)!r}, {batch}, {channels_last})))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(method: str, shape: tuple, batch: int, channels_last: bool = False) -> int:
    """In a fresh process: peak resident memory over one forward+backward above the resident
    memory before it (bytes). The parent sets ``MALLOC_MMAP_THRESHOLD_`` low so that freed
    buffers leave the resident set at once, and the peak (VmHWM) is reset through
    ``/proc/self/clear_refs`` just before the step."""
    cin, cout, size, nt, grad_in, groups, kernel = shape
    module = _make(method, cin, cout, nt, torch.device("cpu"), groups, kernel)
    x = _input(batch, cin, size, torch.device("cpu"), grad_in, channels_last)
    step = _step_fn(module, x)
    step()  # first call: load kernels, size thread pools
    for p in getattr(module, "parameters")():
        p.grad = None
    if x.grad is not None:
        x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def run_conv_bench(batches=(10, 128), device: str = "auto", repeats: int = 5,
                   memory: bool = True, shapes=PAPER_SHAPES + GROUPED_SHAPES,
                   formats: tuple[str, ...] = FORMATS) -> list[ConvCase]:
    """Measure every method on every shape, batch size and memory format (``"NCHW"`` or
    ``"NHWC"``: the inputs of every method alike)."""
    dev = resolve_device(device)
    cases = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"memory format {fmt!r}: use one of {', '.join(FORMATS)}")
        last = fmt == "NHWC"
        for batch in batches:
            for shape in shapes:
                cin, cout, size, nt, grad_in, groups, kernel = shape
                x = _input(batch, cin, size, dev, grad_in, last)
                fns = {m: _step_fn(_make(m, cin, cout, nt, dev, groups, kernel), x) for m in METHODS}
                secs = time_interleaved(fns, dev, repeats)
                peaks = ({m: measure_peak(m, shape, batch, dev, last) for m in METHODS}
                         if memory else {})
                kind = "" if groups == 1 else " dw" if groups == cin == cout else f" g{groups}"
                cases.append(ConvCase(f"{cin}->{cout} @{size}x{size}{kind}", batch, nt, secs, peaks, groups, fmt))
    return cases


def _ratio(c: ConvCase, num: str, den: str = "conv2d") -> float:
    return c.seconds[num] / c.seconds[den]


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_conv_bench(cases: list[ConvCase], device: str) -> str:
    """A table of times and ratios per memory format, and the summary the targets are stated in."""
    impl = f"{native.describe()}, {native_op.describe()}" if str(device).startswith("cpu") else str(device)
    lines = [f"RAPA conv layer, forward+backward, device={device}, {torch.get_num_threads()} threads "
             f"(ratios are to nn.Conv2d in the same memory format)",
             f"random: {impl}; random-pt: the PyTorch path",
             f"{'format':<7}{'layer':<18}{'batch':>6}{'nt':>4}{'conv2d ms':>11}{'none':>7}{'random':>8}{'rand-pt':>8}"
             f"{'naive':>8}{'naive/rand':>11}{'mem rand':>9}{'mem naive':>10}"]
    for c in cases:
        mem = (f"{c.peak_bytes['random'] / max(c.peak_bytes['conv2d'], 1):>9.2f}"
               f"{c.peak_bytes['naive'] / max(c.peak_bytes['conv2d'], 1):>10.2f}") if c.peak_bytes else ""
        lines.append(f"{c.memory_format:<7}{c.shape:<18}{c.batch:>6}{c.nt:>4}{c.seconds['conv2d'] * 1e3:>11.2f}"
                     f"{_ratio(c, 'none'):>7.2f}{_ratio(c, 'random'):>8.2f}{_ratio(c, 'random-pt'):>8.2f}"
                     f"{_ratio(c, 'naive'):>8.2f}{_ratio(c, 'naive', 'random'):>11.2f}{mem}")
    lines.append(f"targets: random/conv2d geomean of the paper's layers <= {TARGET_GEOMEAN}, every layer <= "
                 f"{TARGET_LAYER}, peak memory <= {TARGET_MEMORY}x; none/conv2d <= 1.1; depthwise <= 1.5; "
                 f"naive/random >= 5 at 16 tiles")
    for fmt in dict.fromkeys(c.memory_format for c in cases):
        for batch in sorted({c.batch for c in cases if c.memory_format == fmt}):
            cs = [c for c in cases if c.batch == batch and c.groups == 1 and c.memory_format == fmt]
            if not cs:
                continue
            ratios = [_ratio(c, "random") for c in cs]
            g, worst = geomean(ratios), max(ratios)
            gn, gp = geomean([_ratio(c, "none") for c in cs]), geomean([_ratio(c, "random-pt") for c in cs])
            line = (f"{fmt} batch {batch}: random/conv2d geomean {g:.2f}x ({_mark(g <= TARGET_GEOMEAN)}), "
                    f"worst layer {worst:.2f}x ({_mark(worst <= TARGET_LAYER)}); none/conv2d {gn:.2f}x, "
                    f"random-pt/conv2d {gp:.2f}x")
            if all(c.peak_bytes for c in cs):
                mem = max(c.peak_bytes["random"] / max(c.peak_bytes["conv2d"], 1) for c in cs)
                line += f"; peak memory up to {mem:.2f}x ({_mark(mem <= TARGET_MEMORY)})"
            lines.append(line)
    for c in cases:
        if c.shape.endswith(" dw"):
            lines.append(f"{c.memory_format} batch {c.batch}, depthwise: random/conv2d = {_ratio(c, 'random'):.2f}x "
                         f"(target <= 1.5)")
    for c in cases:
        if c.nt == 16:
            lines.append(f"{c.memory_format} batch {c.batch}, 16 tiles: naive/random = "
                         f"{_ratio(c, 'naive', 'random'):.1f}x (target >= 5)")
    return "\n".join(lines)


def cases_to_json(cases: list[ConvCase]) -> list[dict]:
    """Plain dicts for saving."""
    return [asdict(c) for c in cases]
