"""Conversion of a digital RAPA model to analog arrays, and the analog optimiser.

``convert_to_analog`` walks ``named_children()`` like aihwkit's own
``aihwkit.nn.conversion.convert_to_analog`` and replaces

* every :class:`rapa.TiledConv2d` by an :class:`AnalogTiledConv2d` (one array per replica
  and group),
* every ``nn.Conv2d`` by aihwkit's ``AnalogConv2d`` (one array); a grouped one, or one with
  another padding mode or a padding string, which aihwkit does not take, by an untiled
  :class:`AnalogTiledConv2d` (one array per group),
* every ``nn.Linear`` by aihwkit's ``AnalogLinear`` (one array),

copying the weights. ``prepare`` does that for a :class:`rapa.models.ConvNet` and a
:class:`rapa.config.TrainConfig` and returns aihwkit's ``AnalogSGD``, which changes the
arrays' weights by (pulsed) analog updates and the remaining digital parameters by SGD.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from rapa.analog.backend import check_device, draw_construction_seed, require_aihwkit

require_aihwkit()  # loads aihwkit's simulator with its BLAS threads sized (rapa.analog.backend)
from aihwkit.nn import AnalogConv2d, AnalogLinear
from aihwkit.nn.modules.base import AnalogLayerBase
from aihwkit.optim import AnalogSGD

from rapa.analog.layers import AnalogTiledConv2d
from rapa.analog.presets import AnalogPreset, get_preset, presets_by_layer
from rapa.analog.state import use_plain_state_dict
from rapa.errors import RapaError
from rapa.tile_rates import scale_tile_rates
from rapa.tiled_conv import TiledConv2d


def _generators(model: nn.Module) -> list[torch.Generator]:
    """The torch generators held by ``model``'s modules (kept shared, not copied)."""
    found: dict[int, torch.Generator] = {}
    for module in model.modules():
        g = getattr(module, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def _convert_children(module: nn.Module, preset: AnalogPreset, generator: torch.Generator | None,
                      keep: frozenset[str] = frozenset(), prefix: str = "",
                      own: Mapping[str, AnalogPreset] | None = None) -> None:
    for name, child in module.named_children():
        if isinstance(child, (AnalogLayerBase, AnalogTiledConv2d)):  # already analog
            continue
        if prefix + name in keep:  # stays digital, and so does everything in it
            continue
        preset_here = (own or {}).get(prefix + name, preset)  # a submodule's own preset, for all in it
        if isinstance(child, nn.Conv2d) and (child.groups != 1 or child.padding_mode != "zeros"
                                             or isinstance(child.padding, str)):
            child = TiledConv2d.from_conv2d(child, 1, "none")  # aihwkit's AnalogConv2d takes none of these
        if isinstance(child, TiledConv2d):  # one array per replica and group
            seeds = [draw_construction_seed(generator) for _ in range(child.num_kernels * child.groups)]
            new: nn.Module = AnalogTiledConv2d.from_tiled(child, preset_here, construction_seeds=seeds)
        elif isinstance(child, nn.Conv2d):
            new = AnalogConv2d.from_digital(child, preset_here.rpu_config(draw_construction_seed(generator)))
        elif isinstance(child, nn.Linear):
            new = AnalogLinear.from_digital(child, preset_here.rpu_config(draw_construction_seed(generator)))
        else:
            _convert_children(child, preset_here, generator, keep, f"{prefix}{name}.", own)
            continue
        new.train(child.training)
        setattr(module, name, new)


def convert_to_analog(model: nn.Module, preset: str | AnalogPreset = "rpu-baseline",
                      inplace: bool = False, generator: torch.Generator | None = None,
                      digital: Sequence[str] = (),
                      layer_presets: Mapping[str, str | AnalogPreset] | None = None) -> nn.Module:
    """``model`` with its conv and linear layers on simulated analog arrays.

    ``digital``: names of submodules (as in ``named_modules()``, e.g. ``"fc"``) that stay in
    floating point, with everything inside them; ``layer_presets``: submodule name -> the
    preset of the arrays in it, instead of ``preset`` (e.g. ``{"conv1": ...}``, see
    :func:`rapa.analog.presets.presets_by_layer`). ``ValueError`` names any submodule that the
    model does not have, or one both digital and given a preset.

    ``preset``: see :func:`rapa.analog.get_preset`. Each array's device-to-device variations
    are seeded from ``generator`` (torch's global one if ``None``, so
    :func:`rapa.analog.manual_seed` makes them repeatable). A converted layer's weights are
    the digital layer's (exact write; pulsed devices clip them to their bounds). Not
    ``inplace``, the model is deep-copied first (its torch generators stay shared). The
    result's ``state_dict()`` holds tensors only (see :mod:`rapa.analog.state`).
    """
    preset = get_preset(preset)
    keep = frozenset([digital] if isinstance(digital, str) else digital)
    own = {name: get_preset(p) for name, p in (layer_presets or {}).items()}
    names = {name for name, _ in model.named_modules() if name}
    for what, given in (("digital", keep), ("layer_presets", own)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"{what}={unknown}: the model has no such submodules")
    if keep & set(own):
        raise ValueError(f"layer_presets for {sorted(keep & set(own))}: these stay digital (digital=...)")
    if not inplace:
        memo: dict[int, Any] = {id(g): g for g in _generators(model)}
        model = copy.deepcopy(model, memo)
    if isinstance(model, (TiledConv2d, nn.Conv2d, nn.Linear)):
        holder = nn.Module()
        holder.add_module("layer", model)
        _convert_children(holder, preset, generator)
        return use_plain_state_dict(holder.get_submodule("layer"))
    _convert_children(model, preset, generator, keep, own=own)
    return use_plain_state_dict(model)


def analog_optimizer(model: nn.Module, lr: float, momentum: float = 0.0,
                     weight_decay: float = 0.0) -> AnalogSGD:
    """aihwkit's ``AnalogSGD`` over ``model``: the arrays learn by their analog update at
    rate ``lr`` (no momentum or weight decay there: the arrays hold only the weights);
    digital parameters (digital biases, mixed-pooling weights) by SGD with ``momentum``
    and ``weight_decay``. Changing a group's ``lr`` (a scheduler) reaches the arrays."""
    optimizer = AnalogSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    optimizer.regroup_param_groups(model)
    return optimizer


def prepare(model: nn.Module, config: Any) -> tuple[nn.Module, AnalogSGD]:
    """The analog version of ``model`` (a :class:`rapa.models.ConvNet`) and its optimiser,
    for a :class:`rapa.config.TrainConfig` with ``analog`` set to a preset name.

    The preset's fields are overridden by ``config.analog_options`` (``FIELD=VALUE`` strings
    for every array, ``LAYER.FIELD=VALUE`` for one layer's arrays:
    :func:`rapa.analog.presets.presets_by_layer`). The learning rate is ``config.resolved_lr()``
    (or ``config.lr``), a tiled layer's arrays at ``nk**config.tile_lr_power`` times it and a
    layer named in ``config.layer_lr_scale`` at its factor on top
    (:func:`rapa.tile_rates.scale_tile_rates`), the digital parameters' weight decay ``config.resolved_weight_decay()``, momentum ``config.momentum``.
    Raises :class:`RapaError` if ``config.analog`` is not set or names no preset, or if
    the model lives on CUDA and aihwkit was built without CUDA.
    """
    name = getattr(config, "analog", None)
    if not name:
        raise RapaError("config.analog is not set: name an analog preset, e.g. rpu-baseline")
    preset, own = presets_by_layer(name, tuple(getattr(config, "analog_options", ()) or ()))
    lr = float(config.resolved_lr() if hasattr(config, "resolved_lr") else config.lr)
    weight_decay = float(config.resolved_weight_decay() if hasattr(config, "resolved_weight_decay")
                         else getattr(config, "weight_decay", 0.0) or 0.0)
    momentum = float(getattr(config, "momentum", 0.0))
    param = next(model.parameters(), None)
    if param is not None:
        check_device(param.device)
    analog_model = convert_to_analog(model, preset, digital=tuple(getattr(config, "digital_layers", ()) or ()),
                                     layer_presets=own)
    optimizer = analog_optimizer(analog_model, lr, momentum, weight_decay)
    scales = config.layer_lr_scales() if hasattr(config, "layer_lr_scales") else {}
    scale_tile_rates(optimizer, analog_model, float(getattr(config, "tile_lr_power", 0.0) or 0.0), scales)
    return analog_model, optimizer
