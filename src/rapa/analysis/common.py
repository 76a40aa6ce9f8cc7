"""Helpers shared by the analyses: the tiled layers of a model, batches of inputs, modes.

(``file_keys``, ``read_keys`` and ``json_safe``, the result files' spelling, are
:mod:`rapa.rundir`'s, re-exported here.)"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from rapa.data import ImageData, make_loader
from rapa.errors import RapaError
from rapa.progress import track
from rapa.rundir import file_keys, json_safe, read_keys  # re-exported: the result files' format is rundir's
from rapa.tiled_conv import TiledConv2d

__all__ = ["digital_twin", "file_keys", "frozen_eval", "iter_batches", "json_safe", "model_device",
           "read_keys", "stochastic_in_eval", "tiled_layers"]

NO_TILED_LAYER = "model has no tiled layer"


def tiled_layers(model: nn.Module, require: bool = False) -> list[tuple[str, TiledConv2d]]:
    """``(name, layer)`` of every :class:`TiledConv2d` holding more than one kernel matrix.

    ``require=True`` raises :class:`RapaError` ("model has no tiled layer") when there is none.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TiledConv2d) and m.num_kernels > 1]
    if require and not layers:
        raise RapaError(NO_TILED_LAYER)
    return layers


def digital_twin(model: nn.Module) -> nn.Module:
    """``model`` with every analog layer replaced by a digital one holding its current weights
    (analog runs: their tiled convs expose ``to_digital()``, aihwkit's ``AnalogLinear`` exposes
    ``get_weights()``), for the analyses that read weights. A digital model comes back as is."""
    def is_rapa_analog(module: nn.Module) -> bool:
        return type(module).__module__.startswith("rapa.analog") and hasattr(module, "to_digital")

    def convert(module: nn.Module) -> nn.Module:
        if is_rapa_analog(module):
            return module.to_digital()
        if type(module).__name__ == "AnalogLinear" and hasattr(module, "get_weights"):
            weight, bias = module.get_weights()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            return linear.train(module.training)
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    if not any(is_rapa_analog(m) or type(m).__name__ == "AnalogLinear" for m in model.modules()):
        return model
    return convert(copy.deepcopy(model))


def stochastic_in_eval(model: nn.Module) -> bool:
    """Whether two evaluation passes can differ: some layer with scheme ``random`` and >1 tile."""
    return any(isinstance(m, TiledConv2d) and m.scheme == "random" and m.tiles > 1 for m in model.modules())


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU if it has none)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode with parameter gradients off (input gradients only); restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def iter_batches(data: Any, batch_size: int = 200, device: torch.device | str | None = None,
                 limit: int | None = None, desc: str | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Batches ``(x, y)`` of model inputs (normalised float) and labels (``None`` if absent).

    ``data`` is a :class:`rapa.data.ImageData` (uint8 images, normalised with the
    dataset's mean and std), a float tensor ``x`` (N, C, H, W) of model inputs, a pair
    ``(x, y)`` of tensors, or an iterable of such pairs (e.g. a :class:`rapa.data.BatchLoader`).
    ``limit`` stops after that many images. ``desc`` labels a progress bar (shown where
    :func:`rapa.progress.shown` turned bars on).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None")
    if isinstance(data, ImageData):
        if limit is not None:
            data = ImageData(data.images[:limit], data.labels[:limit], data.num_classes, data.name, data.split)
        source: Iterable = make_loader(data, batch_size, device=device)
    elif isinstance(data, Tensor):
        source = ((data[i:i + batch_size], None) for i in range(0, data.shape[0], batch_size))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        xs, ys = data
        if ys.shape[:1] != xs.shape[:1]:
            raise ValueError(f"labels of shape {tuple(ys.shape)} do not match inputs of shape {tuple(xs.shape)}")
        source = ((xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, xs.shape[0], batch_size))
    else:
        source = data
    if desc is not None:
        n = len(data) if isinstance(data, ImageData) else data.shape[0] if isinstance(data, Tensor) \
            else data[0].shape[0] if isinstance(data, (tuple, list)) and len(data) == 2 else None
        if n is not None and limit is not None:
            n = min(n, limit)
        source = track(source, desc, None if n is None else -(-n // batch_size))
    seen = 0
    for batch in source:  # loop over batches, not images
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if limit is not None:
            x, y = x[: limit - seen], None if y is None else y[: limit - seen]
        if x.numel() == 0:
            break
        if device is not None:
            x, y = x.to(device), None if y is None else y.to(device)
        yield x, y
        seen += x.shape[0]
        if limit is not None and seen >= limit:
            break
