"""``rapa bench conv|train|analog``: side-by-side benchmarks that print ratios.

The options of each benchmark live here; what it measures and prints lives in
:mod:`rapa.bench.conv`, :mod:`rapa.bench.train` and :mod:`rapa.bench.analog`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

from rapa.cli.common import (add_threads, apply_threads, auto_threads, list_type, output_file, positive_int,
                              write_text)

# benchmark -> its one-line summary in `rapa bench --help` (the first line of its module's docstring)
BENCHES = {
    "conv": "one conv layer: nn.Conv2d vs TiledConv2d vs the naive method",
    "train": "training images/s of the untiled and the random (16,4,1) ConvNet, side by side",
    "analog": "analog training step: untiled net on aihwkit AnalogConv2d vs RAPA (16,4,1) analog tiles",
}


def register(sub) -> None:
    p = sub.add_parser("bench")
    which = p.add_subparsers(dest="bench", metavar="BENCH")
    which.required = True
    for name, add, run in (("conv", add_conv_arguments, run_conv), ("train", add_train_arguments, run_train),
                           ("analog", add_analog_arguments, run_analog)):
        q = which.add_parser(name, help=BENCHES[name])
        add(q)
        q.set_defaults(func=run)


def add_conv_arguments(c: argparse.ArgumentParser) -> None:
    """Options of ``rapa bench conv``."""
    c.add_argument("--batch", type=int, nargs="+", default=[10, 128], help="batch sizes")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda")
    c.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (fastest counts)")
    c.add_argument("--formats", type=list_type(str, choices=("nchw", "nhwc")), default=("nchw", "nhwc"),
                   metavar="LIST",
                   help="memory formats of the inputs, comma-separated: nchw (as a user passes them), "
                        "nhwc (channels-last, as rapa.ConvNet runs); default both")
    c.add_argument("--channels-last", dest="formats", action="store_const", const=("nhwc",),
                   help="channels-last inputs only (the same as --formats nhwc)")
    c.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    c.add_argument("--json", type=Path, help="also write the measurements to this file")
    add_threads(c)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``rapa bench train``."""
    p.add_argument("--batch", type=int, nargs="+", default=[10, 128], help="batch sizes (default 10 128)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--images", type=int, default=640,
                   help="training images per timed repetition (default 640)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per net (fastest counts, default 5)")
    add_threads(p)
    p.add_argument("--profile", action="store_true",
                   help="also split one step of each net into its parts (convolution, LRN, ReLU, pooling, FC + "
                        "loss, optimizer, the assignment draw) with torch.profiler")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")


def add_analog_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rapa bench analog``."""
    parser.add_argument("--preset", default="rpu-baseline", help="analog preset (rpu-baseline, ideal, aihwkit:CLASS)")
    parser.add_argument("--batch", type=int, default=10, help="minibatch size (the paper: 10)")
    parser.add_argument("--size", type=int, default=32, help="input side (32: CIFAR, 28: digits)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per net, each on a fresh batch (fastest counts, default 10)")
    parser.add_argument("--device", default="cpu", help="cpu (the simulator of this aihwkit build)")
    add_threads(parser, default="1")  # the simulator's OpenMP regions are slower with more on a busy machine
    parser.add_argument("--json", type=Path, help="also write the measurement to this file")


def check_counts(args: argparse.Namespace, names: Iterable[str]) -> None:
    """RapaError naming the option unless every count in ``names`` (one or a list) is >= 1."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            positive_int(f"--{name}", v)


def prepare(args: argparse.Namespace, counts: Iterable[str], threads: bool = True) -> None:
    """Before a benchmark runs: counts checked, ``--json`` file writable, threads set
    (unless ``threads`` is False: the benchmark sets them itself)."""
    check_counts(args, counts)
    if args.json is not None:
        output_file(args.json, "--json")
    if threads:
        apply_threads(args.threads)


def run_conv(args: argparse.Namespace) -> int:
    """``rapa bench conv``."""
    from rapa.bench.common import resolve_device
    from rapa.bench.conv import cases_to_json, format_conv_bench, run_conv_bench

    prepare(args, ("batch", "repeats"))
    dev = resolve_device(args.device)
    formats = tuple(dict.fromkeys(f.upper() for f in args.formats))
    cases = run_conv_bench(tuple(args.batch), str(dev), args.repeats, not args.no_memory, formats=formats)
    print(format_conv_bench(cases, str(dev)))
    if args.json:
        write_text(args.json, json.dumps(cases_to_json(cases), indent=2))
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``rapa bench train``."""
    from rapa.bench.train import format_train_bench, run_train_bench

    prepare(args, ("batch", "images", "repeats"))
    rows = run_train_bench(tuple(args.batch), args.device, args.images, args.repeats)
    print(format_train_bench(rows))
    result: dict | list = rows
    if args.profile:
        from rapa.bench.train import format_profile, profile_train_step

        profiles = [profile_train_step(b, args.device, max(1, args.images // b), args.repeats) for b in args.batch]
        for p in profiles:
            print(format_profile(p))
        result = {"throughput": rows, "profiles": profiles}
    if args.json:
        write_text(args.json, json.dumps(result, indent=2))
    return 0


def run_analog(args: argparse.Namespace) -> int:
    """``rapa bench analog``: run the benchmark and print the ratio."""
    from dataclasses import asdict

    from rapa.bench.analog import format_analog_bench, run_analog_bench

    prepare(args, ("batch", "size", "repeats"), threads=False)
    threads = auto_threads() if args.threads == "auto" else args.threads  # 0: torch's default
    b = run_analog_bench(args.preset, args.batch, args.size, args.repeats, args.device, threads)
    print(format_analog_bench(b))
    if args.json:
        write_text(args.json, json.dumps(asdict(b), indent=2))
    return 0
