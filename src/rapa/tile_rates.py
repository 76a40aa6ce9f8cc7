"""Per-layer learning rates (``TrainConfig.tile_lr_power``, ``TrainConfig.layer_lr_scale``).

Each replica of a layer with ``nk`` kernel matrices sees about ``1/nk`` of the layer's patches,
so it gets that fraction of the updates; the paper compensates "in part" with a higher rate
(§2.2). :func:`scale_tile_rates` gives every parameter of such a layer the rate ``lr * nk**p``,
and every parameter of a named layer its own factor on top (``{"fc": 0.5}``), in any torch
optimizer (plain SGD, aihwkit's AnalogSGD), keeping the factor in the parameter group so that a
schedule that sets ``group["lr"] = lr * group["lr_scale"]`` keeps it.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from rapa.tiled_conv import TiledConvBase

__all__ = ["layer_rate_factors", "scale_tile_rates", "tile_rate_factors"]


def tile_rate_factors(model: nn.Module, power: float) -> dict[int, float]:
    """``id(param) -> nk**power`` for every parameter of a tiled conv layer with ``nk > 1`` replicas."""
    factor: dict[int, float] = {}
    for m in model.modules():
        if isinstance(m, TiledConvBase) and m.num_kernels > 1:
            for p in m.parameters():
                factor[id(p)] = float(m.num_kernels) ** power
    return factor


def layer_rate_factors(model: nn.Module, power: float = 0.0,
                       layer_scales: Mapping[str, float] | None = None) -> dict[int, float]:
    """``id(param) -> factor``: ``nk**power`` in tiled layers (:func:`tile_rate_factors`) times
    ``layer_scales[name]`` for every parameter of the submodule ``name`` (``ValueError`` naming
    one the model does not have)."""
    factor = tile_rate_factors(model, power) if power else {}
    names = dict(model.named_modules())
    for name, scale in (layer_scales or {}).items():
        if not name or name not in names:
            raise ValueError(f"layer_scales: the model has no submodule {name!r}")
        for p in names[name].parameters():
            factor[id(p)] = factor.get(id(p), 1.0) * float(scale)
    return factor


def scale_tile_rates(optimizer: torch.optim.Optimizer, model: nn.Module, power: float,
                     layer_scales: Mapping[str, float] | None = None) -> None:
    """Give every parameter of a tiled conv layer (``nk > 1`` kernel replicas) the rate
    ``lr * nk**power``, and every parameter of a submodule named in ``layer_scales`` its factor
    on top (e.g. ``{"fc": 0.5}``: the FC layer at half the rate).

    The optimizer's groups are split by factor; each group keeps its factor as ``lr_scale``
    (the trainer sets ``group["lr"] = lr * group["lr_scale"]`` each epoch) and its rate is
    scaled now. Works for torch's SGD and aihwkit's AnalogSGD (one group per array) alike.
    ``power == 0`` and no ``layer_scales`` leave the optimizer as it is.
    """
    if power == 0 and not layer_scales:
        return
    factor = layer_rate_factors(model, power, layer_scales)
    groups = []
    for g in optimizer.param_groups:
        for f in sorted({factor.get(id(p), 1.0) for p in g["params"]}):
            scale = g.get("lr_scale", 1.0) * f
            groups.append(dict(g, params=[p for p in g["params"] if factor.get(id(p), 1.0) == f],
                               lr=g["lr"] * f, lr_scale=scale))
    optimizer.param_groups.clear()
    for g in groups:
        optimizer.add_param_group(g)
