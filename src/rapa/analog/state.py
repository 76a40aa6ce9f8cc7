"""Saving and loading analog models as plain tensors.

aihwkit's own ``state_dict`` stores each array as a Python dict holding its ``RPUConfig``
objects, which ``torch.load(weights_only=True)`` refuses (and unpickling arbitrary
objects is unsafe). Here each array is stored as two tensors instead:

* ``PREFIX.analog_weights``: the array's weight matrix as stored, ``(cout, k [+1 bias
  column])``, not scaled, and
* ``PREFIX.analog_hidden``: its hidden device parameters (device-to-device variations of
  step sizes and bounds, ...), stacked as aihwkit returns them.

Models made by :func:`rapa.analog.convert_to_analog` (and so :func:`rapa.analog.prepare`)
carry hooks (:func:`use_plain_state_dict`) so that their ordinary ``state_dict()`` and
``load_state_dict()`` use this format; :func:`analog_state_dict` and
:func:`load_analog_state_dict` do the same for any model. The arrays' configuration is
not saved: it is the preset's, rebuilt from the run's config. Internal states of compound
devices (aihwkit's ``dump_extra``) and the simulator's random generators are not saved
either; a resumed ``rpu-baseline`` run continues with new noise draws.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from rapa.analog.backend import require_aihwkit

require_aihwkit()  # loads aihwkit's simulator with its BLAS threads sized (rapa.analog.backend)
from aihwkit.simulator.tiles.module import TileModule
from torch import Tensor

WEIGHTS_KEY = "analog_weights"
HIDDEN_KEY = "analog_hidden"
_AIHWKIT_KEYS = ("analog_tile_state", "analog_ctx")
_HOOKED = "_rapa_plain_state_dict"


def _tiles(model: nn.Module) -> list[tuple[str, TileModule]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TileModule)]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _to_plain(model: nn.Module, state: dict[str, Any], prefix: str = "") -> None:
    """Replace aihwkit's per-array entries of ``state`` by the two tensors, in place."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith(_AIHWKIT_KEYS)]:
        del state[key]
    for name, tile in _tiles(model):
        base = prefix + _prefix(name)
        state[base + WEIGHTS_KEY] = tile.tile.get_weights().detach().cpu().clone()
        hidden = tile.tile.get_hidden_parameters().detach().cpu().clone()
        if hidden.numel():
            state[base + HIDDEN_KEY] = hidden


@torch.no_grad()
def _write_arrays(model: nn.Module, arrays: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """Write the two tensors of every array from ``arrays``; return the missing keys."""
    missing = []
    for name, tile in _tiles(model):
        base = prefix + _prefix(name)
        hidden = arrays.get(base + HIDDEN_KEY)
        if hidden is not None:  # bounds and step sizes first: writing weights clips to them
            tile.tile.set_hidden_parameters(hidden.detach().cpu().float())
        weights = arrays.get(base + WEIGHTS_KEY)
        if weights is None:
            missing.append(base + WEIGHTS_KEY)
            continue
        tile.tile.set_weights(weights.detach().cpu().float())
        if hasattr(tile, "_sync_analog_ctx_weights"):
            tile._sync_analog_ctx_weights()
    return missing


def analog_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A ``state_dict`` of ``model`` made of tensors only (``weights_only``-loadable)."""
    state = dict(model.state_dict())
    _to_plain(model, state)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def load_analog_state_dict(model: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a dict made by :func:`analog_state_dict` into ``model``.

    With ``strict``, keys missing on either side raise ``KeyError`` naming them.
    """
    keys = {_prefix(n) + key for n, _ in _tiles(model) for key in (WEIGHTS_KEY, HIDDEN_KEY)}
    plain = {k: v for k, v in state.items() if k not in keys}
    was_hooked = getattr(model, _HOOKED, None)
    if was_hooked is not None:  # the hooks would look for the array tensors we held back
        setattr(model, _HOOKED, None)
    try:
        missing, unexpected = nn.Module.load_state_dict(model, plain, strict=False)
    finally:
        if was_hooked is not None:
            setattr(model, _HOOKED, was_hooked)
    missing = [k for k in missing if not k.endswith(_AIHWKIT_KEYS)]
    missing += [_prefix(n) + WEIGHTS_KEY for n, _ in _tiles(model) if _prefix(n) + WEIGHTS_KEY not in state]
    if strict and (missing or unexpected):
        raise KeyError(f"analog state does not fit the model: missing {sorted(missing)}, "
                       f"unexpected {sorted(unexpected)}")
    _write_arrays(model, state)


def use_plain_state_dict(model: nn.Module) -> nn.Module:
    """Make ``model.state_dict()`` / ``model.load_state_dict()`` use the plain format of this
    module (so checkpoints load with ``torch.load(weights_only=True)``); returns ``model``."""
    if getattr(model, _HOOKED, None) is not None:
        return model
    stash: dict[str, Any] = {}
    setattr(model, _HOOKED, stash)

    def save_hook(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        if getattr(module, _HOOKED, None) is not None:
            _to_plain(module, state, prefix)

    def load_pre_hook(module: nn.Module, state: dict, prefix: str, local_metadata: dict, strict: bool,
                      missing: list, unexpected: list, errors: list) -> None:
        stash.clear()
        if getattr(module, _HOOKED, None) is None:
            return
        keys = [k for k in state if k.startswith(prefix) and k.endswith((WEIGHTS_KEY, HIDDEN_KEY))]
        stash["prefix"] = prefix
        stash["arrays"] = {k: state.pop(k) for k in keys}

    def load_post_hook(module: nn.Module, incompatible: Any) -> None:
        if "arrays" not in stash:
            return
        prefix, arrays = stash.pop("prefix"), stash.pop("arrays")
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.endswith(_AIHWKIT_KEYS)]
        incompatible.missing_keys.extend(_write_arrays(module, arrays, prefix))

    model.register_state_dict_post_hook(save_hook)
    model.register_load_state_dict_pre_hook(load_pre_hook)
    model.register_load_state_dict_post_hook(load_post_hook)
    return model
