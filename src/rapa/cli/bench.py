"""``rapa bench conv|train|analog``: side-by-side benchmarks that print ratios."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Iterable

from rapa.cli.options import add_threads, apply_threads, output_file, write_text
from rapa.errors import RapaError

# benchmark name -> module under rapa.bench with add_arguments(parser) and main(args)
BENCHES = {"conv": "rapa.cli.bench", "train": "rapa.bench.train", "analog": "rapa.bench.analog"}


def register(sub) -> None:
    p = sub.add_parser("bench")
    which = p.add_subparsers(dest="bench", metavar="BENCH")
    which.required = True
    c = which.add_parser("conv", help="one conv layer: nn.Conv2d vs TiledConv2d vs the naive method")
    c.add_argument("--batch", type=int, nargs="+", default=[10, 128], help="batch sizes")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda")
    c.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (fastest counts)")
    c.add_argument("--channels-last", action="store_true",
                   help="give every method NHWC (channels_last) inputs instead of NCHW")
    c.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    c.add_argument("--json", type=Path, help="also write the measurements to this file")
    add_threads(c)
    c.set_defaults(func=run_conv)
    for name in ("train", "analog"):
        try:
            module = importlib.import_module(BENCHES[name])
        except ModuleNotFoundError as exc:
            if exc.name != BENCHES[name]:
                raise
            continue
        q = which.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(q)
        q.set_defaults(func=module.main)


def check_counts(args: argparse.Namespace, names: Iterable[str]) -> None:
    """RapaError naming the option unless every count in ``names`` (one or a list) is >= 1."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v < 1:
                raise RapaError(f"--{name} must be >= 1, got {v}")


def prepare(args: argparse.Namespace, counts: Iterable[str]) -> None:
    """Before a benchmark runs: counts checked, ``--json`` file writable, threads set."""
    check_counts(args, counts)
    if args.json is not None:
        output_file(args.json, "--json")
    apply_threads(args.threads)


def run_conv(args: argparse.Namespace) -> int:
    from rapa.bench.common import resolve_device
    from rapa.bench.conv import cases_to_json, format_conv_bench, run_conv_bench

    prepare(args, ("batch", "repeats"))
    dev = resolve_device(args.device)
    cases = run_conv_bench(tuple(args.batch), str(dev), args.repeats, not args.no_memory,
                           channels_last=args.channels_last)
    print(format_conv_bench(cases, str(dev), "NHWC" if args.channels_last else "NCHW"))
    if args.json:
        write_text(args.json, json.dumps(cases_to_json(cases), indent=2))
    return 0
