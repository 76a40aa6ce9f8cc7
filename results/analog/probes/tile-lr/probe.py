"""Probe (not a feature): `rapa train` with each tiled conv layer's rate scaled by its tile count.

The paper (Methods): "the number of updates is effectively reduced per array tile, which can be
in part compensated by increasing the learning rate". Here every parameter of a layer with
nk > 1 kernel replicas (digital TiledConv2d or AnalogTiledConv2d) steps at lr * nk**POWER
(env TILE_LR_POWER, default 0.5); every other layer at lr. The epoch's lr (rapa's schedule)
is scaled just for the step and restored after it, so the schedule is unchanged.
Usage (from the repo root):

    TILE_LR_POWER=0.5 python results/analog/probes/tile-lr/probe.py train ARGS...
"""
import os
import sys

import rapa.train as train
from rapa.cli import main
from rapa.tiled_conv import TiledConvBase

POWER = float(os.environ.get("TILE_LR_POWER", "0.5"))
_make = train.make_model_and_optimizer


def _scaled(config, info, device, train_data=None):
    model, optimizer = _make(config, info, device, train_data)
    scale = {}
    for name, m in model.named_modules():
        if isinstance(m, TiledConvBase) and m.num_kernels > 1:
            for p in m.parameters():
                scale[id(p)] = m.num_kernels ** POWER
            print(f"probe: {name} ({m.num_kernels} replicas) lr x {m.num_kernels ** POWER:.3g}", file=sys.stderr)
    groups = []  # each group split by factor (torch's SGD has one group; AnalogSGD one per array)
    for g in optimizer.param_groups:
        for f in sorted({scale.get(id(p), 1.0) for p in g["params"]}):
            groups.append(dict(g, params=[p for p in g["params"] if scale.get(id(p), 1.0) == f], lr_factor=f))
    optimizer.param_groups = groups
    factors = [g["lr_factor"] for g in groups]
    step = optimizer.step

    def scaled_step(*args, **kwargs):
        for g, f in zip(optimizer.param_groups, factors):
            g["lr"] *= f
        try:
            return step(*args, **kwargs)
        finally:
            for g, f in zip(optimizer.param_groups, factors):
                g["lr"] /= f

    optimizer.step = scaled_step
    return model, optimizer


train.make_model_and_optimizer = _scaled
sys.exit(main(sys.argv[1:]))
