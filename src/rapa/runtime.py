"""The analog run-time model of RAPA conv layers (paper Fig. 1, §3.3, §4.2; SPEC §1).

On an analog array a matrix-vector product (forward or backward) and a rank-one update
each take one step, whatever the size of the ``k x cout`` matrix. A conv layer feeds its
``np`` image patches through the array one after another, so its time per image is
``np`` steps per pass, while the digital compute is ``np * k * cout`` MACs. With ``nt``
replicated arrays working in parallel, each array sees ``ceil(np/nt)`` patches:

    patches_per_tile = ceil(np / nt)
    forward = backward = update = patches_per_tile        (cycles per image, per layer)
    untiled = np                                           (the same pass on one array)

Two ways to run the layers:

- *sequential*: the layers of one image run one after another; time is the sum over
  layers of ``forward + backward + update``.
- *pipelined*: every layer works on a different image at once (Ben-Nun & Hoefler 2018);
  time per image is that of the slowest layer, the bottleneck.

The speed-up is untiled time over tiled time in either mode. For the paper's net on
32x32 inputs, ``np = (1024, 256, 64)`` and ``nt = (16, 4, 1)`` give 64 patches per tile
in every layer: load balance 1.0 and a pipelined speed-up of 16.

``perforated`` layers hold one array but, in training, only ``ceil(np/nt)`` patches go
through it; in evaluation all ``np`` do (``LayerCost.inference``).

A grouped layer (``groups > 1``; depthwise: ``groups == cin``) has one ``k x cout/groups``
kernel matrix per group (``k = kh*kw*cin/groups``), each its own array; a tile is one array
per group. All of a layer's arrays work in parallel on the same patches, so its cycles are
those of an ungrouped layer with the same ``np`` and ``nt``; it occupies ``nt * groups``
arrays (``LayerCost.groups``, ``arrays``, ``weights``).

AlexNet (:func:`alexnet_convs`, torchvision's layout at 224x224) has
``np = (3025, 729, 169, 169, 169)``. :func:`rapa.convert.balanced_tiles` asks that no
layer exceed the smallest ``np`` and so gives ``ceil(np/169) = (18, 5, 1, 1, 1)``
(patches per tile ``(169, 146, 169, 169, 169)``, pipelined speed-up 3025/169 = 17.9).
The paper's suggestion ``(17, 4, 1, 1, 1)`` is ``floor(np/169)``: patches per tile
``(178, 183, 169, 169, 169)``, so the second layer is the bottleneck (speed-up
3025/183 = 16.5), although its min/max balance (0.92) looks better than that of
``(18, 5, 1, 1, 1)`` (0.86), which is why :attr:`RuntimeReport.utilization` is reported too.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from rapa import schemes
from rapa.convert import balanced_tiles, conv_layers, conv_output_pixels
from rapa.tiled_conv import TiledConv2d

PASSES: tuple[str, ...] = ("forward", "backward", "update")

CSV_COLUMNS: tuple[str, ...] = (
    "name", "np", "k", "cout", "macs", "nt", "scheme", "arrays", "weights", "patches_per_tile",
    "forward", "backward", "update", "cycles", "untiled_cycles", "inference", "speedup", "groups",
)


@dataclass
class LayerCost:
    """Analog cost of one conv layer for one image (cycles = array operations in sequence)."""

    name: str
    """Layer name (the module's qualified name in the model)."""
    np: int
    """Output pixels = image patches per image."""
    k: int
    """Patch length ``kh * kw * cin`` (per group): rows of the kernel matrix."""
    cout: int
    """Output channels of the layer (all groups together)."""
    nt: int = 1
    """Tiles: patches are divided among ``nt`` arrays (for ``perforated`` the perforation factor)."""
    scheme: str = "none"
    """Tiling scheme (:data:`rapa.schemes.SCHEMES`)."""
    bias: bool = True
    """Whether each array also holds a bias per output channel (counted in ``weights``)."""
    groups: int = 1
    """Groups of a grouped convolution: each group's ``k x cout/groups`` kernel matrix is its
    own array, all groups' arrays work in parallel on the same patches (so cycles do not
    change with ``groups``; arrays and weights count every group)."""
    arrays: int = field(init=False)
    """Analog arrays the layer occupies: ``nt * groups`` (``groups`` for ``none`` and ``perforated``)."""
    macs: int = field(init=False)
    """Multiply-accumulates of the forward pass, ``np * k * cout`` (the same tiled or not)."""
    weights: int = field(init=False)
    """Stored weights over all arrays, biases included: ``arrays * (k + bias) * cout / groups``."""
    patches_per_tile: int = field(init=False)
    """Patches the busiest array processes: ``ceil(np / nt)``."""
    forward: int = field(init=False)
    """Forward cycles in training: one matrix-vector product per patch, arrays in parallel."""
    backward: int = field(init=False)
    """Backward cycles: one transposed matrix-vector product per patch."""
    update: int = field(init=False)
    """Update cycles: one rank-one (outer-product) update per patch."""
    inference: int = field(init=False)
    """Forward cycles in evaluation (``np`` for ``perforated``, else ``patches_per_tile``)."""
    untiled: int = field(init=False)
    """Cycles of one pass on a single untiled array: ``np``."""

    def __post_init__(self) -> None:
        for name in ("np", "k", "cout", "nt", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (layer {self.name!r})")
        try:
            schemes.check_scheme(self.scheme, self.nt)
        except ValueError as exc:
            raise ValueError(f"layer {self.name!r}: {exc}") from None
        if self.nt > self.np:
            raise ValueError(f"tiles={self.nt} for layer {self.name!r}, which has only np={self.np} "
                             "output pixels: some tiles would get no patch")
        if self.cout % self.groups:
            raise ValueError(f"groups={self.groups} does not divide cout={self.cout} (layer {self.name!r})")
        self.arrays = schemes.num_kernels(self.scheme, self.nt) * self.groups
        self.macs = self.np * self.k * self.cout
        self.weights = self.arrays * (self.k + int(self.bias)) * (self.cout // self.groups)
        self.patches_per_tile = -(-self.np // self.nt)
        self.forward = self.backward = self.update = self.patches_per_tile
        self.inference = self.np if self.scheme == "perforated" else self.patches_per_tile
        self.untiled = self.np

    @property
    def cycles(self) -> int:
        """Training cycles per image: ``forward + backward + update``."""
        return self.forward + self.backward + self.update

    @property
    def untiled_cycles(self) -> int:
        """Training cycles per image on one untiled array: ``3 * np``."""
        return len(PASSES) * self.untiled

    @property
    def speedup(self) -> float:
        """``untiled_cycles / cycles`` of this layer."""
        return self.untiled_cycles / self.cycles

    def to_dict(self) -> dict[str, Any]:
        """The fields and derived numbers as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        d.update(cycles=self.cycles, untiled_cycles=self.untiled_cycles, speedup=self.speedup)
        return d


@dataclass
class RuntimeReport:
    """Per-layer analog costs of a network and the totals and speed-ups they imply."""

    layers: list[LayerCost]
    """One entry per conv layer, in forward order."""
    input_size: tuple[int, ...] | None = None
    """The ``(C, H, W)`` the pixel counts were found for (``None`` if given directly)."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers=[]: the model has no conv layer")

    @property
    def tiles(self) -> tuple[int, ...]:
        """``nt`` per layer."""
        return tuple(c.nt for c in self.layers)

    @property
    def macs(self) -> int:
        """Forward MACs per image over all conv layers."""
        return sum(c.macs for c in self.layers)

    @property
    def arrays(self) -> int:
        """Analog arrays used by all conv layers."""
        return sum(c.arrays for c in self.layers)

    @property
    def weights(self) -> int:
        """Stored weights over all arrays, biases included."""
        return sum(c.weights for c in self.layers)

    @property
    def untiled_weights(self) -> int:
        """Weights of the same layers with one array each."""
        return sum((c.k + int(c.bias)) * c.cout for c in self.layers)  # cout = groups * cout/groups

    @property
    def sequential_cycles(self) -> int:
        """Training cycles per image, layers one after another: sum of layer cycles."""
        return sum(c.cycles for c in self.layers)

    @property
    def sequential_untiled_cycles(self) -> int:
        """The same for the untiled layout: ``3 * sum(np)``."""
        return sum(c.untiled_cycles for c in self.layers)

    @property
    def pipelined_cycles(self) -> int:
        """Training cycles per image with layers pipelined across images: the bottleneck."""
        return max(c.cycles for c in self.layers)

    @property
    def pipelined_untiled_cycles(self) -> int:
        """The same for the untiled layout: ``3 * max(np)``."""
        return max(c.untiled_cycles for c in self.layers)

    @property
    def speedup_sequential(self) -> float:
        """Untiled over tiled time, sequential execution."""
        return self.sequential_untiled_cycles / self.sequential_cycles

    @property
    def speedup_pipelined(self) -> float:
        """Untiled over tiled time, pipelined execution (:func:`analog_speedup`)."""
        return analog_speedup([c.np for c in self.layers], [c.nt for c in self.layers])

    @property
    def load_balance(self) -> float:
        """``min / max`` patches per tile over the layers (1.0: every layer takes equally long)."""
        ppt = [c.patches_per_tile for c in self.layers]
        return min(ppt) / max(ppt)

    @property
    def utilization(self) -> float:
        """Mean over max patches per tile: the fraction of a pipeline stage the arrays are busy."""
        ppt = [c.patches_per_tile for c in self.layers]
        return sum(ppt) / (len(ppt) * max(ppt))

    def summary(self) -> dict[str, Any]:
        """The totals, speed-ups and balance as a JSON-ready dict."""
        keys = ("tiles", "macs", "arrays", "weights", "untiled_weights", "sequential_cycles",
                "sequential_untiled_cycles", "pipelined_cycles", "pipelined_untiled_cycles",
                "speedup_sequential", "speedup_pipelined", "load_balance", "utilization")
        out = {key: getattr(self, key) for key in keys}
        out["tiles"] = list(out["tiles"])
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything: input size, per-layer costs and :meth:`summary`."""
        return {"input_size": None if self.input_size is None else list(self.input_size),
                "layers": [c.to_dict() for c in self.layers], **self.summary()}

    def write_csv(self, path: str | Path) -> None:
        """One row per layer with the columns :data:`CSV_COLUMNS`."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for c in self.layers:
                writer.writerow(c.to_dict())

    def table(self) -> str:
        """A plain-text table of the layers and the speed-ups."""
        head = (f"{'layer':<10}{'np':>7}{'k':>7}{'cout':>6}{'MACs':>13}{'tiles':>7}{'arrays':>8}"
                f"{'patches/tile':>14}{'cycles':>8}{'untiled':>9}")
        lines = [head, "-" * len(head)]
        for c in self.layers:
            lines.append(f"{c.name:<10}{c.np:>7}{c.k:>7}{c.cout:>6}{c.macs:>13,}{c.nt:>7}{c.arrays:>8}"
                         f"{c.patches_per_tile:>14}{c.cycles:>8}{c.untiled_cycles:>9}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<10}{'':>7}{'':>7}{'':>6}{self.macs:>13,}{'':>7}{self.arrays:>8}"
                     f"{'':>14}{self.sequential_cycles:>8}{self.sequential_untiled_cycles:>9}")
        lines += [
            "cycles per image = forward + backward + update, each one array operation per patch",
            f"sequential: {self.sequential_untiled_cycles} -> {self.sequential_cycles} cycles, "
            f"speed-up {self.speedup_sequential:.2f}x",
            f"pipelined:  {self.pipelined_untiled_cycles} -> {self.pipelined_cycles} cycles "
            f"(bottleneck), speed-up {self.speedup_pipelined:.2f}x",
            f"load balance (min/max patches per tile) {self.load_balance:.3f}, "
            f"utilization (mean/max) {self.utilization:.3f}",
            f"arrays {self.arrays}, weights {self.weights:,} (untiled {self.untiled_weights:,})",
        ]
        return "\n".join(lines)


def analog_speedup(output_pixels: Sequence[int], tiles: Sequence[int] | None) -> float:
    """Theoretical analog speed-up of a pipelined net: ``max_l np_l / max_l ceil(np_l / nt_l)``.

    Analog time of a layer is the patches its busiest tile processes (SPEC §1); in a
    pipeline the slowest layer sets the pace (forward, backward and update alike, so the
    ratio is that of the training cycles too). ``tiles=None``: untiled, 1.0.
    """
    if tiles is None:
        return 1.0
    return max(output_pixels) / max(-(-n // t) for n, t in zip(output_pixels, tiles))


def _layer_shape(layer: nn.Module) -> tuple[int, int, int, str, bool, int]:
    """``(k, cout, nt, scheme, bias, groups)`` of an ``nn.Conv2d`` or ``TiledConv2d`` (``k``
    per group)."""
    kh, kw = layer.kernel_size
    k = kh * kw * layer.in_channels // layer.groups
    if isinstance(layer, TiledConv2d):
        return k, layer.out_channels, layer.tiles, layer.scheme, layer.bias is not None, layer.groups
    return k, layer.out_channels, 1, "none", layer.bias is not None, layer.groups


def runtime_model(
    model_or_layers: nn.Module | Sequence[Sequence[int]],
    input_size: Sequence[int] | None = None,
    tiles: str | Sequence[int] | None = None,
    scheme: str | None = None,
) -> RuntimeReport:
    """Analog costs of every conv layer (``nn.Conv2d`` or ``TiledConv2d``) of a model.

    ``model_or_layers`` is any ``nn.Module`` (its ``np`` are counted by running one input
    of ``input_size`` ``(C, H, W)`` through it) or a sequence of ``(np, k, cout)`` per layer.
    Each layer keeps its own tiles and scheme (``nn.Conv2d``: 1, ``none``) unless ``tiles``
    overrides them: one number per conv layer, or ``"balanced"``
    (:func:`rapa.convert.balanced_tiles`, square for grid schemes), with ``scheme``
    (default ``"random"``). Raises ``ValueError`` for inconsistent arguments.
    """
    if isinstance(model_or_layers, nn.Module):
        if input_size is None:
            raise ValueError("input_size=None: give (C, H, W) to count the output pixels of a model")
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 3 or min(input_size) < 1:
            raise ValueError(f"input_size={input_size!r} must be three positive integers (C, H, W)")
        convs = conv_layers(model_or_layers)
        if not convs:
            raise ValueError("the model has no nn.Conv2d or TiledConv2d layer")
        nps = conv_output_pixels(model_or_layers, input_size)
        missing = [n for n, _ in convs if n not in nps]
        if missing:
            raise ValueError(f"conv layers {missing} are not called in the model's forward")
        rows = [(n, nps[n], *_layer_shape(m)) for n, m in convs]
    else:
        rows = []
        for j, shape in enumerate(model_or_layers):
            if len(shape) != 3:
                raise ValueError(f"layer {j}: {tuple(shape)!r} must be (np, k, cout)")
            rows.append((f"conv{j + 1}", *(int(v) for v in shape), 1, "none", True, 1))
        if not rows:
            raise ValueError("model_or_layers=[]: give at least one layer")
    if tiles is not None:
        scheme = "random" if scheme is None else scheme
        if isinstance(tiles, str):
            if tiles != "balanced":
                raise ValueError(f"tiles={tiles!r}: give one number per conv layer or 'balanced'")
            nts = [1] * len(rows) if scheme == "none" else balanced_tiles(
                [r[1] for r in rows], square=scheme in schemes.GRID_SCHEMES)
        else:
            nts = list(tiles)
            if len(nts) != len(rows):
                raise ValueError(f"tiles={tuple(nts)} has {len(nts)} entries but the model has "
                                 f"{len(rows)} conv layers")
        rows = [(n, np_, k, cout, nt, scheme, bias, groups)
                for (n, np_, k, cout, _, _, bias, groups), nt in zip(rows, nts)]
    elif scheme is not None:
        raise ValueError(f"scheme={scheme!r} without tiles: give tiles to re-tile the model")
    layers = [LayerCost(n, np_, k, cout, nt, sch, bias, groups) for n, np_, k, cout, nt, sch, bias, groups in rows]
    return RuntimeReport(layers, input_size if isinstance(model_or_layers, nn.Module) else None)


def alexnet_convs() -> nn.Sequential:
    """AlexNet's five conv layers with ReLU and max pooling, torchvision's layout.

    Meant for 3x224x224 inputs: ``np = (55*55, 27*27, 13*13, 13*13, 13*13)``. Layers are
    named ``conv1`` .. ``conv5`` (not torchvision's state-dict keys).
    """
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
        ("conv2", nn.Conv2d(64, 192, kernel_size=5, padding=2)),
        ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
        ("conv3", nn.Conv2d(192, 384, kernel_size=3, padding=1)),
        ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(384, 256, kernel_size=3, padding=1)),
        ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(256, 256, kernel_size=3, padding=1)),
        ("relu5", nn.ReLU(inplace=True)),
        ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
    ]))


def plot_runtime(report: RuntimeReport, path: str | Path) -> None:
    """Two panels: MACs per layer, and analog cycles per image per layer, untiled vs tiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy

    names = [c.name for c in report.layers]
    x = numpy.arange(len(names))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].bar(x, [c.macs / 1e6 for c in report.layers], 0.6, color="C3")
    ax[0].set_ylabel("MACs per image (millions)")
    ax[0].set_title("Compute per layer (same untiled and tiled)")
    w = 0.4
    ax[1].bar(x - w / 2, [c.untiled_cycles for c in report.layers], w, color="C7", label="untiled")
    ax[1].bar(x + w / 2, [c.cycles for c in report.layers], w, color="C0",
              label="tiled, nt = " + ",".join(str(t) for t in report.tiles))
    ax[1].axhline(report.pipelined_cycles, color="C0", ls="--", lw=1, label="tiled bottleneck")
    ax[1].set_ylabel("analog cycles per image (fwd + bwd + update)")
    ax[1].set_title(f"Analog time per layer: speed-up {report.speedup_pipelined:.1f}x pipelined, "
                    f"{report.speedup_sequential:.1f}x sequential", fontsize=9)
    ax[1].legend(fontsize=8)
    for a in ax:
        a.set_xticks(x)
        a.set_xticklabels(names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
