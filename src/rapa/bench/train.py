"""training images/s of the untiled and the random (16,4,1) ConvNet, side by side

Each measurement is a run of SGD steps (forward, cross-entropy, backward, update) of the
paper's ConvNet on random images of CIFAR-10's shape (3x32x32, 10 classes) already on the
device, so it times the network, not the data pipeline. The nets are timed round-robin and
the fastest repetition is reported. Target: the tiled net within 1.5x of the untiled. On the
CPU the tiled net is also timed on the pure-PyTorch path (``rapa.native.disabled()``), the
fallback where the native kernels cannot be built.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from rapa.bench.common import resolve_device, time_interleaved
from rapa.models import ConvNet
from rapa.ops import native as rnative

NETS: dict[str, tuple[str, tuple[int, int, int] | None]] = {
    "untiled": ("none", None),
    "random 16,4,1": ("random", (16, 4, 1)),
}
PYTORCH_PATH = "PyTorch path"  # the tiled net without the native CPU kernels
TARGET_RATIO = 1.5


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
    impl = rnative.describe() if dev.type == "cpu" else dev.type
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
