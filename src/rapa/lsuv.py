"""Layer-sequential unit-variance rescaling of an initialisation (LSUV).

Mishkin & Matas 2016, "All you need is a good init" (ICLR, arXiv 1511.06422): after a
data-free initialisation, pass a batch of training images through the net and, layer by
layer in forward order, divide each layer's weights by the standard deviation of its
output, so that every layer's output has unit variance on real data.

Why rapa has it: He's ``sqrt(2 / fan_in)`` assumes zero-mean, independent inputs. In a
random-tiled net the replicas of a layer have different kernel sums, so a positive-mean
input (after ReLU and pooling) gives every output pixel a different offset, and the
activations grow layer by layer: on Fashion-MNIST the paper net with tiles (16, 4, 1)
reaches the FC layer with inputs about 3x larger than the untiled net's (README, analog
training). On analog arrays that inflates the pulsed updates of the later layers; in
floating point it raises their effective learning rate. LSUV removes the growth at the
start, for tiled and untiled nets alike.

The tiles of a layer are scaled by one common factor (their relative sizes stay as drawn);
biases are left alone (they start at zero in rapa's nets). The forward passes run in the
model's training mode, so random tiling draws assignments (from the layers' generators)
as in training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from rapa.tiled_conv import TiledConvBase

LSUV_IMAGES = 500
"""Number of training images (the first ones) the trainer rescales on."""


def lsuv_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s weight layers LSUV scales, in registration (forward) order:
    ``nn.Conv2d``, ``nn.Linear`` and RAPA conv layers."""
    return [name for name, m in model.named_modules()
            if name and isinstance(m, (nn.Conv2d, nn.Linear, TiledConvBase)) and isinstance(
                getattr(m, "weight", None), torch.Tensor)]


@torch.no_grad()
def lsuv_(model: nn.Module, images: Tensor, layers: Sequence[str] | None = None, target_std: float = 1.0,
          iters: int = 3, tol: float = 0.01) -> dict[str, float]:
    """Rescale ``model``'s layers in place so that each one's output has standard deviation
    ``target_std`` on ``images`` (a batch as the model takes it); returns the factor each
    layer's weights were multiplied by.

    ``layers``: names of submodules in forward order (default :func:`lsuv_layers`). Each is
    measured and scaled up to ``iters`` times, stopping when within ``tol`` (relative) of
    the target. A layer whose output is constant (std 0) is left alone.
    """
    if not (isinstance(target_std, (int, float)) and target_std > 0):
        raise ValueError(f"target_std={target_std!r} must be a positive number")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r} must be a positive integer")
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] < 2:
        raise ValueError("images must be a batch of at least 2 inputs, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    names = list(lsuv_layers(model) if layers is None else layers)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not isinstance(getattr(modules[n], "weight", None),
                                                                      torch.Tensor)]
    if missing:
        raise ValueError(f"layers {missing} are not weight layers of the model")
    was_training = model.training
    model.train()
    factors: dict[str, float] = {}
    try:
        for name in names:
            layer = modules[name]
            total = 1.0
            for _ in range(iters):
                seen: list[Tensor] = []
                handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
                try:
                    model(images)
                finally:
                    handle.remove()
                std = float(seen[0].float().std()) if seen else 0.0
                if not 0 < std < math.inf:  # constant, not reached, or not finite: leave it
                    break
                if abs(std / target_std - 1.0) <= tol:
                    break
                scale = target_std / std
                layer.weight.mul_(scale)
                total *= scale
            factors[name] = total
    finally:
        model.train(was_training)
    return factors
