"""What :func:`rapa.convert` made of a model: every conv layer with its tiles, patches per
tile and analog speed-up (the run-time model of :mod:`rapa.runtime`).

    summary = rapa.conversion_summary(model, input_size=(1, 28, 28))
    print(summary)

lists each conv layer (converted ``TiledConv2d`` or left as ``nn.Conv2d``), its kernel,
groups, output pixels ``np``, scheme, ``nt``, arrays, patches per tile and speed-up, and the
network's sequential and pipelined speed-ups. ``rapa convert`` prints it for a built-in net.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch.nn as nn

from rapa.convert import conv_layers
from rapa.runtime import RuntimeReport, runtime_model
from rapa.tiled_conv import TiledConv2d


@dataclass
class LayerSummary:
    """One conv layer of a (converted) model."""

    name: str
    """The layer's qualified name in the model."""
    tiled: bool
    """Whether it is a ``TiledConv2d`` (else an ``nn.Conv2d`` left as it is)."""
    shape: str
    """``cin->cout kh x kw``, with ``/s`` for a stride other than 1."""
    groups: int
    """Groups (``cin`` for a depthwise layer): each group's kernel matrix is its own array."""
    np: int
    """Output pixels (patches) per image."""
    scheme: str
    """Tiling scheme (``none`` for a layer left as ``nn.Conv2d``)."""
    nt: int
    """Tiles (1 for a layer left as ``nn.Conv2d``)."""
    arrays: int
    """Analog arrays of the layer (``nt * groups`` for a tiled scheme)."""
    patches_per_tile: int
    """``ceil(np / nt)``: patches the busiest array processes per image."""
    speedup: float
    """The layer's analog speed-up, ``np / patches_per_tile``."""


@dataclass
class ConversionSummary:
    """Every conv layer of a model and the analog speed-ups of :mod:`rapa.runtime`;
    ``str(summary)`` is a table."""

    layers: list[LayerSummary]
    """One entry per conv layer, in definition order."""
    report: RuntimeReport
    """The run-time model's report (cycles, arrays, weights, load balance)."""
    input_size: tuple[int, ...]
    """The ``(C, H, W)`` the pixel counts are for."""

    @property
    def converted(self) -> list[str]:
        """Names of the tiled layers."""
        return [layer.name for layer in self.layers if layer.tiled]

    @property
    def left(self) -> list[str]:
        """Names of the conv layers left as ``nn.Conv2d``."""
        return [layer.name for layer in self.layers if not layer.tiled]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: input size, layers, speed-ups."""
        return {"input_size": list(self.input_size), "layers": [vars(layer) for layer in self.layers],
                "speedup_sequential": self.report.speedup_sequential,
                "speedup_pipelined": self.report.speedup_pipelined,
                "arrays": self.report.arrays, "load_balance": self.report.load_balance}

    def __str__(self) -> str:
        width = max(12, *(len(layer.name) + 1 for layer in self.layers))
        head = (f"{'layer':<{width}}{'type':<13}{'shape':<16}{'groups':>7}{'np':>7}  {'scheme':<14}{'nt':>4}"
                f"{'arrays':>8}{'patches/tile':>14}{'speed-up':>10}")
        lines = [f"conversion of a model with inputs {tuple(self.input_size)}", head, "-" * len(head)]
        for s in self.layers:
            kind = "TiledConv2d" if s.tiled else "nn.Conv2d"
            lines.append(f"{s.name:<{width}}{kind:<13}{s.shape:<16}{s.groups:>7}{s.np:>7}  {s.scheme:<14}{s.nt:>4}"
                         f"{s.arrays:>8}{s.patches_per_tile:>14}{s.speedup:>9.2f}x")
        r = self.report
        lines += ["-" * len(head),
                  f"{len(self.converted)} of {len(self.layers)} conv layers tiled"
                  + (f"; left as nn.Conv2d: {', '.join(self.left)}" if self.left else ""),
                  f"analog speed-up (training cycles per image): sequential {r.speedup_sequential:.2f}x "
                  f"({r.sequential_untiled_cycles} -> {r.sequential_cycles}), pipelined "
                  f"{r.speedup_pipelined:.2f}x ({r.pipelined_untiled_cycles} -> {r.pipelined_cycles})",
                  f"arrays {r.arrays}, load balance (min/max patches per tile) {r.load_balance:.3f}"]
        return "\n".join(lines)


def _shape(layer: nn.Module) -> str:
    kh, kw = layer.kernel_size
    s = f"{layer.in_channels}->{layer.out_channels} {kh}x{kw}"
    stride = tuple(layer.stride)
    return s + (f"/{stride[0]}" if stride[0] == stride[1] else f"/{stride}") if stride != (1, 1) else s


def conversion_summary(model: nn.Module, input_size: Sequence[int]) -> ConversionSummary:
    """The conv layers of ``model`` (after :func:`rapa.convert`, or any model) with their
    tiles and analog speed-ups for one input of ``input_size`` ``(C, H, W)``; ``ValueError``
    for a model without conv layers or a bad ``input_size``."""
    report = runtime_model(model, input_size)
    layers = []
    for (name, layer), cost in zip(conv_layers(model), report.layers):
        layers.append(LayerSummary(name, isinstance(layer, TiledConv2d), _shape(layer), layer.groups, cost.np,
                                   cost.scheme, cost.nt, cost.arrays, cost.patches_per_tile,
                                   cost.untiled_cycles / cost.cycles))
    return ConversionSummary(layers, report, tuple(int(s) for s in input_size))
