"""``convert``: replace the ``nn.Conv2d`` layers of any model by ``TiledConv2d`` layers."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn as nn

from rapa import schemes
from rapa.tiled_conv import TiledConv2d


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every ``nn.Conv2d`` or ``TiledConv2d`` in forward-definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, TiledConv2d))]


@torch.no_grad()
def conv_output_pixels(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Number of output pixels ``np`` of every conv layer for one input of ``input_size``
    ``(C, H, W)``, found by running an example input through ``model`` with hooks."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: sizes.__setitem__(name, o.shape[-2] * o.shape[-1]))
             for name, m in conv_layers(model)]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=None if p is None else p.device,
                        dtype=None if p is None else p.dtype)
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes


def balanced_tiles(nps: Sequence[int], square: bool = False) -> list[int]:
    """For each layer the smallest ``nt`` with ``ceil(np/nt) <= min(np)`` (square if asked).

    For the paper's net on 32x32, ``np = (1024, 256, 64)`` gives ``(16, 4, 1)``.
    """
    target = min(nps)
    out = []
    for np_ in nps:
        nt = -(-np_ // target)
        if square:
            q = math.isqrt(nt)
            nt = q * q if q * q == nt else (q + 1) ** 2
        out.append(nt)
    return out


Skip = Union[Iterable[str], Callable[[str, nn.Module], bool], None]


def skipped_names(model: nn.Module, skip: Skip) -> set[str]:
    """Names of the ``nn.Conv2d`` layers of ``model`` that ``skip`` leaves digital.

    ``skip`` is ``None``, a predicate ``(name, layer) -> bool``, or layer names; a name also
    covers every layer inside the module of that name (``"stem"`` covers ``"stem.0"``). A
    name that matches no conv layer raises ``ValueError`` naming it.
    """
    convs = [(n, m) for n, m in conv_layers(model) if isinstance(m, nn.Conv2d)]
    if skip is None:
        return set()
    if callable(skip):
        return {n for n, m in convs if skip(n, m)}
    if isinstance(skip, str):
        skip = [skip]
    names = list(skip)
    out: set[str] = set()
    for want in names:
        hit = {n for n, _ in convs if n == want or n.startswith(want + ".")}
        if not hit:
            raise ValueError(f"skip={want!r} names no nn.Conv2d layer of the model; its conv layers "
                             f"are {[n for n, _ in convs]}")
        out |= hit
    return out


def convert(
    model: nn.Module,
    tiles: int | Sequence[int] | str = "balanced",
    scheme: str = "random",
    input_size: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    skip: Skip = None,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` of ``model`` (in place, walking ``named_children()``) by a
    ``TiledConv2d`` whose tiles copy its kernel (groups, padding and padding mode included).

    ``tiles`` is one number for all converted layers, one per converted layer (in definition
    order), or ``"balanced"``, which needs ``input_size`` ``(C, H, W)`` (see
    :func:`balanced_tiles`; balanced over the converted layers). ``skip`` leaves layers as
    they are (:func:`skipped_names`: names or a predicate). Returns ``model``;
    :func:`rapa.summary.conversion_summary` describes the result.
    """
    left = skipped_names(model, skip)
    convs = [(n, m) for n, m in conv_layers(model) if isinstance(m, nn.Conv2d) and n not in left]
    if isinstance(tiles, str):
        if tiles != "balanced":
            raise ValueError(f"tiles={tiles!r}: give a number, one number per layer, or 'balanced'")
        if input_size is None:
            raise ValueError("tiles='balanced' needs input_size=(C, H, W) to count output pixels")
        if not convs:
            return model
        nps = conv_output_pixels(model, input_size)
        missing = [n for n, _ in convs if n not in nps]
        if missing:
            raise ValueError(f"conv layers {missing} are not called in the model's forward")
        per_layer = balanced_tiles([nps[n] for n, _ in convs], square=scheme in schemes.GRID_SCHEMES)
    elif isinstance(tiles, int):
        per_layer = [tiles] * len(convs)
    else:
        per_layer = [int(t) for t in tiles]
        if len(per_layer) != len(convs):
            raise ValueError(f"tiles={tuple(tiles)} has {len(per_layer)} entries but the model has "
                             f"{len(convs)} nn.Conv2d layers to convert")
    if scheme == "none":
        per_layer = [1] * len(convs)
    plan = dict(zip((n for n, _ in convs), per_layer))
    _replace(model, "", plan, scheme, generator)
    return model


def _replace(module: nn.Module, prefix: str, plan: dict[str, int], scheme: str,
             generator: torch.Generator | None) -> None:
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Conv2d) and full in plan:
            setattr(module, name, TiledConv2d.from_conv2d(child, plan[full], scheme, generator))
        else:
            _replace(child, full + ".", plan, scheme, generator)
