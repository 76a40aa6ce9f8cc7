"""``rapa speedup``: the analog run-time model of a tiled network (paper Fig. 1, §4.2).

Counts the image patches ``np`` of every conv layer, divides them among the tiles, and
prints per layer the MACs, the patches each array processes and the cycles per image
(forward + backward + update), with the speed-up over the untiled layout for sequential
and pipelined execution and the load balance. With ``--out`` also writes
``runtime.json``, ``runtime.csv`` and ``runtime.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rapa.cli.common import int_list, output_folder, write_text
from rapa.errors import RapaError

if TYPE_CHECKING:
    import torch.nn as nn

MODELS: tuple[str, ...] = ("convnet", "alexnet")
DEFAULT_INPUT: dict[str, tuple[int, int, int]] = {"convnet": (3, 32, 32), "alexnet": (3, 224, 224)}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``speedup`` subcommand."""
    from rapa.schemes import SCHEMES

    p = subparsers.add_parser("speedup", description=__doc__)
    p.add_argument("--model", default="convnet",
                   help=f"network: {' or '.join(MODELS)} (default convnet, the paper's net)")
    p.add_argument("--tiles", default="balanced",
                   help="tiles per conv layer, e.g. 16,4,1, or 'balanced' (default)")
    p.add_argument("--input-size", default=None,
                   help="C,H,W of one input (default 3,32,32 for convnet, 3,224,224 for alexnet)")
    p.add_argument("--scheme", default="random", choices=SCHEMES,
                   help="tiling scheme (default random; perforated uses one array per layer)")
    p.add_argument("--channels", default="32,32,64",
                   help="convnet only: output channels of the three conv layers (default 32,32,64)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for runtime.json, runtime.csv and runtime.png (default: print only)")
    p.set_defaults(func=run)


def build(model: str, input_size: tuple[int, int, int], channels: tuple[int, ...]) -> "nn.Module":
    """The untiled network named ``model`` for inputs of ``input_size``."""
    if model == "alexnet":
        from rapa.runtime import alexnet_convs

        return alexnet_convs()
    from rapa.models import ConvNet

    return ConvNet(in_channels=input_size[0], channels=channels, tiles=None, scheme="none",
                   image_size=input_size[1:])


def run(args: argparse.Namespace) -> int:
    """Print the run-time table; write the files to ``--out`` when given."""
    from rapa.convert import conv_layers
    from rapa.runtime import plot_runtime, runtime_model

    if args.model not in MODELS:
        raise RapaError(f"--model {args.model!r} is unknown; choose one of {', '.join(MODELS)}")
    input_size = DEFAULT_INPUT[args.model] if args.input_size is None else int_list(
        "--input-size", args.input_size, 3)
    channels = int_list("--channels", args.channels, 3)
    if args.out is not None:
        output_folder(args.out)
    try:
        model = build(args.model, input_size, channels)
    except ValueError as exc:
        raise RapaError(str(exc)) from None
    if args.tiles == "balanced":
        tiles: str | tuple[int, ...] = "balanced"
    else:
        tiles = int_list("--tiles", args.tiles)
        n = len(conv_layers(model))
        if len(tiles) != n:
            raise RapaError(f"--tiles {args.tiles!r}: {args.model} has {n} conv layers, "
                            f"give {n} numbers or 'balanced'")
    try:
        report = runtime_model(model, input_size, tiles=tiles, scheme=args.scheme)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: input too small for the net
        raise RapaError(str(exc).splitlines()[0]) from None
    print(f"{args.model}, input {'x'.join(map(str, input_size))}, scheme {args.scheme}, "
          f"tiles {','.join(map(str, report.tiles))}")
    print(report.table())
    if args.out is not None:
        result = {"settings": {"model": args.model, "tiles": args.tiles, "scheme": args.scheme,
                               "input_size": list(input_size),
                               "channels": list(channels) if args.model == "convnet" else None},
                  **report.to_dict()}
        write_text(args.out / "runtime.json", json.dumps(result, indent=1))
        report.write_csv(args.out / "runtime.csv")
        plot_runtime(report, args.out / "runtime.png")
        print(f"wrote runtime.json, runtime.csv and runtime.png to {args.out}")
    return 0
