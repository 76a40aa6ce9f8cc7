"""training images/s of the untiled and the random (16,4,1) ConvNet, side by side

Each measurement is a run of SGD steps (forward, cross-entropy, backward, update) of the
paper's ConvNet on random images of CIFAR-10's shape (3x32x32, 10 classes) already on the
device, so it times the network, not the data pipeline. The nets are timed round-robin and
the fastest repetition is reported. Target: the tiled net within 1.10x of the untiled. On the
CPU the tiled net is also timed on the pure-PyTorch path (``rapa.native.disabled()``), the
fallback where the native kernels cannot be built. :func:`profile_train_step` splits a step
of both nets into its parts (``rapa bench train --profile``).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from rapa.bench.common import resolve_device, sync, time_interleaved
from rapa.models import ConvNet
from rapa.ops import native as rnative
from rapa.ops import native_op

NETS: dict[str, tuple[str, tuple[int, int, int] | None]] = {
    "untiled": ("none", None),
    "random 16,4,1": ("random", (16, 4, 1)),
}
PYTORCH_PATH = "PyTorch path"  # the tiled net without the native CPU kernels
TARGET_RATIO = 1.10

# parts of a step for --profile: profiler op names -> part (the rest is "other")
PARTS: dict[str, tuple[str, ...]] = {
    "convolution": ("NativeTiledConv2dFn", "NativeTiledConv2dFnBackward", "TiledConv2dFn", "TiledConv2dFnBackward",
                    "rapa::random_tiled_conv", "rapa::tiled_conv", "torch::autograd::CppNode<rapa_op::TiledConv>",
                    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                    "aten::convolution"),
    "LRN": ("aten::pow", "aten::mul", "aten::div", "aten::add", "aten::avg_pool2d", "aten::avg_pool2d_backward",
            "aten::neg", "aten::pow_backward"),
    "ReLU": ("aten::clamp_min", "aten::relu", "aten::threshold_backward"),
    "max pooling": ("aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward"),
    "FC + loss": ("aten::addmm", "aten::mm", "aten::_log_softmax", "aten::nll_loss_forward",
                  "aten::_log_softmax_backward_data", "aten::nll_loss_backward", "aten::sum"),
    "optimizer": ("Optimizer.step#SGD.step", "Optimizer.zero_grad#SGD.zero_grad", "aten::add_", "aten::_foreach_add_"),
}


def make_step(scheme: str, tiles, batch: int, device: torch.device, steps: int,
              native: bool = True):
    """A closure running ``steps`` SGD steps of one net at ``batch`` images per step
    (``native=False``: tiled convolutions on the PyTorch path)."""

    torch.manual_seed(0)
    model = ConvNet(10, 3, tiles=tiles, scheme=scheme, image_size=32, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, weight_decay=1e-7)
    x = torch.randn(batch, 3, 32, 32, device=device)  # (B, 3, 32, 32)
    y = torch.randint(0, 10, (batch,), device=device)  # (B,)

    def run() -> None:
        with contextlib.nullcontext() if native else rnative.disabled():
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    return run


def run_train_bench(batches=(10, 128), device: str = "auto", images: int = 640,
                    repeats: int = 5) -> list[dict]:
    """Images/s of every net at every batch size."""

    dev = resolve_device(device)
    impl = f"{rnative.describe()}, {native_op.describe()}" if dev.type == "cpu" else dev.type
    rows = []
    for batch in batches:
        steps = max(1, images // batch)
        fns = {name: make_step(scheme, tiles, batch, dev, steps) for name, (scheme, tiles) in NETS.items()}
        if dev.type == "cpu" and rnative.enabled():
            fns[PYTORCH_PATH] = make_step(*NETS["random 16,4,1"], batch, dev, steps, native=False)
        secs = time_interleaved(fns, dev, repeats)
        rows.append({"batch": batch, "steps": steps, "device": str(dev), "threads": torch.get_num_threads(),
                     "tiled_conv": impl, "images_per_s": {name: steps * batch / s for name, s in secs.items()}})
    return rows


def format_train_bench(rows: list[dict]) -> str:
    """A table of images/s and the untiled/tiled ratio with the target."""
    names = list(NETS)
    extra = bool(rows) and PYTORCH_PATH in rows[0]["images_per_s"]
    where = f"device={rows[0]['device']}, {rows[0]['threads']} CPU thread(s)" if rows else ""
    lines = [f"training images/s, paper's ConvNet on 3x32x32, {where}",
             f"tiled convolutions: {rows[0]['tiled_conv']}" if rows else "",
             f"{'batch':>6}" + "".join(f"{n:>16}" for n in names) + f"{'slowdown':>10}"
             + (f"{PYTORCH_PATH:>16}{'slowdown':>10}" if extra else "")]
    for r in rows:
        ips = r["images_per_s"]
        ratio = ips[names[0]] / ips[names[1]]
        line = (f"{r['batch']:>6}" + "".join(f"{ips[n]:>16.0f}" for n in names) + f"{ratio:>9.2f}x")
        if extra:
            line += f"{ips[PYTORCH_PATH]:>16.0f}{ips[names[0]] / ips[PYTORCH_PATH]:>9.2f}x"
        lines.append(line + f"  (target <= {TARGET_RATIO}: {'ok' if ratio <= TARGET_RATIO else 'MISSED'})")
    return "\n".join(lines)


def profile_train_step(batch: int = 10, device: str = "auto", steps: int = 20, rounds: int = 3) -> dict:
    """Milliseconds per SGD step of each part (:data:`PARTS`) of the untiled and the random
    (16,4,1) net: the profiler's self CPU time of its ops (the calling thread's view), the
    fastest of ``rounds`` interleaved rounds per part; plus each net's wall time per step and
    the tiled net's assignment draws (its layers' ``assignment``, timed alone)."""
    from torch.profiler import ProfilerActivity, profile

    dev = resolve_device(device)
    op_part = {op: part for part, ops in PARTS.items() for op in ops}
    best: dict[str, dict[str, float]] = {name: {} for name in NETS}
    wall: dict[str, float] = {}
    runs = {name: make_step(scheme, tiles, batch, dev, steps) for name, (scheme, tiles) in NETS.items()}
    for name in NETS:
        runs[name]()  # warm-up
    for _ in range(rounds):
        for name, run in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                run()
                sync(dev)
                elapsed = (time.perf_counter() - t0) / steps * 1e3
            parts: dict[str, float] = {}
            for e in prof.key_averages():
                key = op_part.get(e.key, "other")
                parts[key] = parts.get(key, 0.0) + e.self_cpu_time_total / steps / 1e3
            for key, ms in parts.items():
                best[name][key] = min(best[name].get(key, float("inf")), ms)
            wall[name] = min(wall.get(name, float("inf")), elapsed)
    torch.manual_seed(0)
    tiled = ConvNet(10, 3, tiles=NETS["random 16,4,1"][1], scheme="random", image_size=32, device=dev)
    draw_ms = _draw_ms(tiled, batch, dev)
    return {"batch": batch, "steps": steps, "threads": torch.get_num_threads(), "device": str(dev),
            "parts_ms": best, "step_ms_profiled": wall, "draw_ms": draw_ms}


def _draw_ms(model: ConvNet, batch: int, device: torch.device, repeats: int = 20) -> float:
    """Milliseconds per step of the assignment draws of the tiled layers of ``model``."""
    from rapa.tiled_conv import TiledConv2d

    x = torch.randn(batch, 3, 32, 32, device=device)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0]))
             for m in model.modules() if isinstance(m, TiledConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    layers = [(m, xi) for m, xi in inputs.items() if m.tiles > 1]

    def draws() -> None:
        for m, xi in layers:
            m.assignment(xi)
    return time_interleaved({"draw": draws}, device, repeats)["draw"] * 1e3


def format_profile(p: dict) -> str:
    """The parts of a step side by side, with the difference."""
    names = list(NETS)
    parts = list(PARTS) + ["other"]
    lines = [f"where a training step goes, batch {p['batch']}, {p['threads']} thread(s), device={p['device']}: "
             f"ms per step, the profiler's self CPU time of each part's ops (best of the rounds)",
             f"{'part':<14}" + "".join(f"{n:>16}" for n in names) + f"{'difference':>12}"]
    for part in parts:
        a, b = (p["parts_ms"][n].get(part, 0.0) for n in names)
        lines.append(f"{part:<14}{a:>16.3f}{b:>16.3f}{b - a:>+12.3f}")
    ta, tb = (sum(p["parts_ms"][n].values()) for n in names)
    lines.append(f"{'sum':<14}{ta:>16.3f}{tb:>16.3f}{tb - ta:>+12.3f}")
    wa, wb = (p["step_ms_profiled"][n] for n in names)
    lines.append(f"{'wall (profiled)':<14}{wa:>15.3f}{wb:>16.3f}{wb - wa:>+12.3f}")
    lines.append(f"the tiled net's assignment draws (part of its convolution's Python time): {p['draw_ms']:.3f} ms "
                 f"per step")
    return "\n".join(lines)
