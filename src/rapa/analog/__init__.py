"""Training on simulated analog arrays (paper §3.2, SPEC §5) with IBM's aihwkit 1.2.0.

The only part of rapa that imports aihwkit, and only when a name that needs it is used:
``import rapa.analog`` works without it, and :func:`require_aihwkit` says how to install it.

>>> from rapa import analog
>>> analog_model, optimizer = analog.prepare(model, config)   # config.analog = "rpu-baseline"
>>> layer = analog.AnalogTiledConv2d(3, 32, 5, padding=2, tiles=16, preset="ideal")
>>> state = analog.analog_state_dict(analog_model)             # plain tensors only

Every replica of a tiled conv layer, and the fully connected layer, is its own aihwkit
analog array; :class:`aihwkit.optim.AnalogSGD` updates them by pulses.
"""

from __future__ import annotations

import importlib
from typing import Any

from rapa.analog.backend import INSTALL_HINT, aihwkit_available, manual_seed, require_aihwkit
from rapa.analog.presets import (PRESETS, AihwkitPreset, AnalogPreset, IdealizedPreset, IdealPreset,
                                 RPUBaselinePreset, get_preset, layer_options, presets_by_layer,
                                 preset_options)

# names that need aihwkit, and the submodule defining each
_LAZY = {
    "AnalogTiledConv2d": "rapa.analog.layers",
    "convert_to_analog": "rapa.analog.convert",
    "analog_optimizer": "rapa.analog.convert",
    "prepare": "rapa.analog.convert",
    "analog_state_dict": "rapa.analog.state",
    "load_analog_state_dict": "rapa.analog.state",
    "use_plain_state_dict": "rapa.analog.state",
}

__all__ = [
    "INSTALL_HINT",
    "PRESETS",
    "AihwkitPreset",
    "AnalogPreset",
    "IdealPreset",
    "IdealizedPreset",
    "RPUBaselinePreset",
    "aihwkit_available",
    "get_preset",
    "layer_options",
    "presets_by_layer",
    "preset_options",
    "manual_seed",
    "require_aihwkit",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rapa.analog' has no attribute {name!r}")
    require_aihwkit()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
