"""What the analog arrays are doing: bounds, scales and saturated pulsed updates, per array.

Two read-outs that explain why a net trains worse on pulsed arrays than in floating point
(README, "What kept the arrays from learning"; issue 12's probes), each computed from what
aihwkit 1.2.0 holds or is about to use, not from a model of it:

* :func:`array_stats`: for every analog array of a model, its digital output scale
  (``alpha``, aihwkit's mapping scale), the rms of its logical weights (``alpha`` times the
  stored conductances) and the fraction of its stored weights within one mean pulse
  (``dw_min``) of *that device's own* bound (aihwkit's hidden ``max_bound`` / ``min_bound``,
  device-to-device variations included). A weight at its bound cannot grow further: the
  update pushing it is lost.
* :func:`replica_similarity`: for every analog layer holding several replicas of its kernel
  matrix, the paper's filter similarity across them (SPEC §4) of the weights as stored. In
  floating point a random-tiled net's replicas stay alike; on pulsed arrays each replica's own
  devices and pulse noise move it apart from the others (README, issue 12).
* :class:`UpdateMonitor`: wraps an :class:`aihwkit.optim.AnalogSGD` and, before each step,
  reads every array's stored inputs ``x`` and output gradients ``d`` to count the pulses
  each rank-one update asks for, ``lr * max|x| * max|d| / (alpha * dw_min)`` (aihwkit's
  update-management ``k``, ``rpu_pulsed_meta_parameter.cpp``). Rows asking for more than
  the pulse train's maximum length (``desired_bl``, 31 for ``rpu-baseline``) get a
  *smaller* update than SGD's: aihwkit scales their ``d`` down to fit the train. The
  monitor adds no pulses and changes no update.

Imports aihwkit: import this module only where aihwkit is required.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from rapa.analog.backend import require_aihwkit

require_aihwkit()  # loads aihwkit's simulator with its BLAS threads sized (rapa.analog.backend)
from aihwkit.optim.context import AnalogContext
from rapa.analog.layers import AnalogTiledConv2d
from rapa.analog.state import _tiles
from rapa.tiled_conv import tile_correlation

__all__ = ["ArrayStats", "UpdateMonitor", "array_stats", "epoch_record", "format_stats", "layer_stats",
           "replica_similarity"]


@dataclass
class ArrayStats:
    """One analog array's state (:func:`array_stats`)."""

    name: str
    """Module path of the array (``conv1.arrays.3``: replica 3 of conv1; ``fc``)."""
    rows: int
    """Output rows of the array (``cout``)."""
    cols: int
    """Input columns as stored (``k``, plus one when the bias is an array column)."""
    scale: float
    """Digital output scale ``alpha`` (logical weight = ``alpha`` x stored weight); 1 when unmapped."""
    weight_rms: float
    """Rms of the logical weights (``alpha`` x stored)."""
    at_bound: float
    """Fraction of stored weights within one ``dw_min`` of their own device's bound (0 for
    devices without bounds)."""


def _arrays(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, aihwkit tile)`` for every analog tile in ``model`` (module order), named by the
    layer holding it (``conv1.arrays.3``, not its ``.analog_module``)."""
    return [(re.sub(r"(^|\.)analog_module$", "", name), tile) for name, tile in _tiles(model)]


def _layer_of(name: str) -> str:
    """The layer an array belongs to: ``conv1.arrays.3`` -> ``conv1``; ``fc`` -> ``fc``."""
    return re.sub(r"(^|\.)arrays\.\d+$", "", name)


def _dw_min(tile: Any) -> float | None:
    dw = getattr(getattr(tile.rpu_config, "device", None), "dw_min", None)
    return float(dw) if dw else None


def _scale(tile: Any) -> float:
    scales = tile.get_mapping_scales() if hasattr(tile, "get_mapping_scales") else None
    return float(scales.float().mean()) if scales is not None else 1.0


@torch.no_grad()
def array_stats(model: nn.Module) -> list[ArrayStats]:
    """:class:`ArrayStats` of every analog array of ``model``, in module order."""
    stats = []
    for name, tile in _arrays(model):
        w = tile.tile.get_weights().detach().float().cpu()  # (rows, cols): stored conductances
        alpha = _scale(tile)
        hidden = tile.get_hidden_parameters() if hasattr(tile, "get_hidden_parameters") else {}
        at_bound = 0.0
        if "max_bound" in hidden and "min_bound" in hidden:
            tol = _dw_min(tile) or 0.0
            hi, lo = hidden["max_bound"].float().cpu(), hidden["min_bound"].float().cpu()
            at_bound = float(((w >= hi - tol) | (w <= lo + tol)).float().mean())
        stats.append(ArrayStats(name, w.shape[0], w.shape[1], alpha,
                                float((alpha * w).pow(2).mean().sqrt()), at_bound))
    return stats


def layer_stats(stats: list[ArrayStats]) -> dict[str, dict[str, float]]:
    """``array_stats`` grouped by layer (``conv1.arrays.3`` -> ``conv1``): number of arrays,
    mean scale, rms of the logical weights and fraction at a bound over all its weights."""
    groups: dict[str, list[ArrayStats]] = defaultdict(list)
    for s in stats:
        groups[_layer_of(s.name)].append(s)
    out = {}
    for layer, arrays in groups.items():
        n = sum(a.rows * a.cols for a in arrays)
        out[layer] = {
            "arrays": float(len(arrays)),
            "scale": sum(a.scale for a in arrays) / len(arrays),
            "weight_rms": (sum(a.weight_rms ** 2 * a.rows * a.cols for a in arrays) / n) ** 0.5,
            "at_bound": sum(a.at_bound * a.rows * a.cols for a in arrays) / n,
        }
    return out


@torch.no_grad()
def replica_similarity(model: nn.Module) -> dict[str, float]:
    """``{layer: similarity}`` for every analog tiled layer of ``model`` with two or more
    replicas: the mean over output channels of the mean Pearson correlation between the
    replicas' filters (:func:`rapa.tiled_conv.tile_correlation`, SPEC §4), from the weights as
    the arrays store them (an exact read). Empty if no analog layer has replicas."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, AnalogTiledConv2d) and layer.num_kernels > 1:
            out[name] = float(tile_correlation(layer.get_weights()[0]).nanmean())  # over (cout,) channels
    return out


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` over the last dim, flattened to one value per row. Two plain reductions:
    aihwkit's ``AnalogConv2d`` keeps its inputs as a transposed view, on which ``abs()`` (a
    full copy) or ``vector_norm(inf)`` cost 10-20x more (0.2 vs 3.6 ms for conv2's, batch 10)."""
    return torch.maximum(t.amax(-1), -t.amin(-1)).flatten()


class UpdateMonitor:
    """Counts, per array, the rank-one updates that ask for more pulses than the train holds.

    >>> monitor = UpdateMonitor(optimizer, model)   # an AnalogSGD over model's arrays
    >>> ...train...                                 # optimizer.step() as usual
    >>> monitor.summary()                           # {layer: {"rows", "saturated", "mean_pulses"}}
    >>> monitor.close()                             # the optimizer's own step again

    ``summary()`` groups arrays by layer as :func:`layer_stats` does: ``rows`` rank-one
    updates seen, ``saturated`` the fraction of them asking for more than ``desired_bl``
    pulses, ``mean_pulses`` the mean of ``lr * max|x| * max|d| / (alpha * dw_min)`` over them.
    Arrays whose device has no ``dw_min`` (e.g. floating-point tiles) are not counted.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer = optimizer
        self._names = {id(tile): name for name, tile in _arrays(model)}
        self._counts: dict[str, list[Any]] = defaultdict(lambda: [0, 0.0, 0.0])  # rows, saturated, pulses
        self._step = optimizer.step
        self._own_step = vars(optimizer).get("step")  # an instance's own step, if it had one
        optimizer.step = self._monitored_step  # type: ignore[method-assign]

    @torch.no_grad()
    def _count(self) -> None:
        for group in self.optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            for param in group["params"]:
                if not isinstance(param, AnalogContext) or not param.has_gradient() or lr <= 0:
                    continue
                tile = param.analog_tile
                dw_min = _dw_min(tile)
                if dw_min is None:
                    continue
                bl = int(tile.rpu_config.update.desired_bl)
                scales = tile.get_mapping_scales()
                counts = self._counts[self._names.get(id(tile), f"array{id(tile)}")]
                for x, d in zip(param.analog_input, param.analog_grad_output):
                    d = d.detach()
                    if scales is not None:  # aihwkit's pre_update: d / alpha before the pulses
                        d = d / scales.to(d).view(-1)  # d is small (cout columns); x is not copied
                    pulses = lr * _abs_max(x.detach()) * _abs_max(d) / dw_min  # (rows,)
                    counts[0] += pulses.numel()
                    counts[1] += (pulses > bl).sum()  # tensors: no sync with a GPU until summary()
                    counts[2] += pulses.sum()

    def _monitored_step(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self._step(*args, **kwargs)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer: ``rows`` seen, ``saturated`` fraction, ``mean_pulses`` asked for."""
        layers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for name, (rows, sat, pulses) in self._counts.items():
            acc = layers[_layer_of(name)]
            acc[0] += float(rows)
            acc[1] += float(sat)
            acc[2] += float(pulses)
        return {layer: {"rows": rows, "saturated": sat / rows if rows else 0.0,
                        "mean_pulses": pulses / rows if rows else 0.0}
                for layer, (rows, sat, pulses) in layers.items()}

    def reset(self) -> None:
        """Forget the counts so far."""
        self._counts.clear()

    def close(self) -> None:
        """Give the optimizer its own ``step`` back."""
        if self._own_step is not None:
            self.optimizer.step = self._own_step  # type: ignore[method-assign]
        else:
            vars(self.optimizer).pop("step", None)  # the class's step again


def format_stats(model: nn.Module) -> str:
    """A table of :func:`layer_stats` for ``model``'s arrays."""
    rows = ["| layer | arrays | scale alpha | logical weight rms | weights at a bound |", "|---|---|---|---|---|"]
    for layer, s in layer_stats(array_stats(model)).items():
        rows.append(f"| {layer or '(model)'} | {int(s['arrays'])} | {s['scale']:.3g} | {s['weight_rms']:.4f} | "
                    f"{100 * s['at_bound']:.2f}% |")
    return "\n".join(rows)


def epoch_record(model: nn.Module, monitor: UpdateMonitor | None, epoch: int) -> dict[str, Any]:
    """What ``rapa train --analog`` writes to ``arrays.json`` after an epoch: per layer, the
    arrays' state (:func:`layer_stats`), the similarity of each tiled layer's replicas
    (:func:`replica_similarity`, when it has any) and the epoch's pulsed updates
    (:meth:`UpdateMonitor.summary`; the monitor is then reset for the next epoch)."""
    record: dict[str, Any] = {"epoch": int(epoch), "layers": layer_stats(array_stats(model))}
    similarity = replica_similarity(model)
    if similarity:
        record["similarity"] = similarity
    if monitor is not None:
        record["updates"] = monitor.summary()
        monitor.reset()
    return record
