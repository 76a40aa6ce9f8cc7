"""``rapa convert``: what :func:`rapa.convert` makes of a net (which layers are tiled, how).

Builds a net of :mod:`rapa.nets` from plain ``nn.Conv2d`` layers, converts it as
``rapa.convert(net, tiles, scheme, input_size, skip=...)`` would in a user's script and
prints :func:`rapa.summary.conversion_summary`: every conv layer with its groups, output
pixels, tiles, arrays, patches per tile and analog speed-up, and the network's speed-ups.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapa.cli.common import int_list, output_file, write_text
from rapa.errors import RapaError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand."""
    from rapa.nets import NETS
    from rapa.schemes import SCHEMES

    p = subparsers.add_parser("convert", description=__doc__)
    p.add_argument("--net", default="resnet", choices=sorted(NETS), help="the net to convert (default resnet)")
    p.add_argument("--input-size", default="1,28,28", help="C,H,W of one input (default 1,28,28)")
    p.add_argument("--tiles", default="balanced",
                   help="'balanced' (default), one number for every layer, or one per converted layer: 16,4,1,...")
    p.add_argument("--scheme", default="random", choices=SCHEMES, help="tiling scheme (default random)")
    p.add_argument("--skip", nargs="+", default=None, metavar="NAME",
                   help="layers (or modules holding layers) to leave as nn.Conv2d, e.g. stem")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build, convert and summarise; ``RapaError`` (one line, exit 2) for bad options."""
    size = int_list("--input-size", args.input_size)
    if len(size) != 3:
        raise RapaError(f"--input-size {args.input_size!r}: give three numbers C,H,W")
    tiles: str | int | tuple[int, ...] = args.tiles
    if args.tiles != "balanced":
        per_layer = int_list("--tiles", args.tiles)
        tiles = per_layer[0] if len(per_layer) == 1 else per_layer
    if args.json is not None:
        output_file(args.json, "--json")

    from rapa.convert import convert
    from rapa.nets import build_net
    from rapa.summary import conversion_summary

    net = build_net(args.net, in_channels=size[0])
    try:
        convert(net, tiles, args.scheme, input_size=size, skip=args.skip)
        summary = conversion_summary(net, size)
    except (ValueError, RuntimeError) as exc:  # bad tiles or skip names, an input too small for the net
        raise RapaError(str(exc).splitlines()[0]) from None
    print(f"rapa convert --net {args.net}: rapa.convert(net, tiles={tiles!r}, scheme={args.scheme!r}, "
          f"input_size={size}, skip={args.skip})")
    print(summary)
    if args.json is not None:
        write_text(args.json, json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0
