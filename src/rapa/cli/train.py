"""``rapa train``: train the paper's ConvNet into a run directory (SPEC §3).

A new run: ``rapa train --dataset cifar10 --scheme random --tiles 16,4,1 --epochs 700
--out runs/c10-random``. Continue a stopped run: ``rapa train --resume runs/c10-random``
(the run's saved config is used; only ``--epochs``, ``--device``, ``--data-dir``, ``--votes``,
``--eval-every`` and ``--lr`` may be given with it: a lower ``--lr`` is the way on after a
non-finite loss stopped a run). Train again into a folder that holds a run with ``--overwrite``
(the old run's files are deleted). ``--tiles balanced`` takes the fewest tiles per layer that
balance the layers' analog time (:func:`rapa.convert.balanced_tiles`; 16,4,1 on 32x32 images).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rapa.cli.options import add_threads, apply_threads, output_folder
from rapa.errors import RapaError

# options that build a new config; with --resume only the ones in _RESUME_OK may be given
_CONFIG_OPTIONS = ("dataset", "scheme", "tiles", "channels", "pooling", "epochs", "batch_size", "lr",
                   "warmup_epochs", "lr_step", "gamma", "augment", "seed", "device", "data_dir",
                   "download", "limit_train", "limit_test", "votes", "analog", "eval_every", "init")
_RESUME_OK = ("epochs", "device", "data_dir", "votes", "eval_every", "lr")


UNTILED = "none"
"""What ``--tiles none`` parses to (None would read as "not given")."""
BALANCED = "balanced"
"""``--tiles balanced``: :func:`rapa.convert.balanced_tiles` of the dataset's layer sizes."""


def tiles_arg(text: str) -> tuple[int, ...] | str:
    """``"16,4,1"`` -> ``(16, 4, 1)``; ``"none"`` -> :data:`UNTILED`; ``"balanced"`` -> :data:`BALANCED`."""
    word = text.strip().lower()
    return word if word in (UNTILED, BALANCED) else int_triple(text)


def int_triple(text: str) -> tuple[int, ...]:
    """``"32,32,64"`` -> ``(32, 32, 64)``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated integers like 16,4,1, got {text!r}")
    return values  # the length is checked by TrainConfig.validate


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/DATASET-SCHEME-TILES-sSEED)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="train afresh into --out even if it holds a run (that run's files are deleted)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    add_threads(p)
    p.add_argument("--json", action="store_true",
                   help="print the final summary as one JSON document on stdout (progress goes to stderr)")
    p.set_defaults(func=run)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The TrainConfig options; every default is None (= the TrainConfig default)."""
    from rapa.config import TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", help=f"cifar10, cifar100, svhn, fashion-mnist, digits (default {d.dataset})")
    p.add_argument("--scheme", help=f"tiling scheme; none = untiled (default {d.scheme})")
    p.add_argument("--tiles", type=tiles_arg,
                   help="tiles per conv layer, e.g. 16,4,1; balanced = the fewest that balance the layers; "
                        "none = untiled (default 16,4,1)")
    p.add_argument("--channels", type=int_triple, help="conv channels (default 32,32,64)")
    p.add_argument("--enlarged", action="store_true",
                   help="channels 54,64,64 (the paper's enlarged baseline is --enlarged --scheme none)")
    p.add_argument("--pooling", help=f"pool1/pool2: max, avg, stochastic, mixed (default {d.pooling})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help="learning rate (default 0.005 untiled, 0.025 tiled; with "
                                             "--analog 0.01 for both)")
    p.add_argument("--warmup-epochs", type=int, help=f"epochs at lr/20 first (default {d.warmup_epochs})")
    p.add_argument("--lr-step", type=int, help=f"multiply lr by --gamma every N epochs (default {d.lr_step})")
    p.add_argument("--gamma", type=float, help=f"step decay factor (default {d.gamma})")
    p.add_argument("--augment", help=f"none, moderate, strong (default {d.augment})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--device", help="auto, cpu, cuda (default auto)")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--download", action="store_const", const=True, help="download missing dataset files")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, help="use only the first N test images")
    p.add_argument("--votes", type=int, help=f"predictions per image for majority voting (default {d.votes})")
    p.add_argument("--eval-every", type=int, help="measure the test error every N epochs (default 1)")
    p.add_argument("--analog", metavar="PRESET",
                   help="train on simulated analog arrays (needs rapa[analog]): rpu-baseline (the paper's "
                        "device), idealized, ideal or aihwkit:CLASS; its recipe defaults to --init he and "
                        "the --analog learning rates")
    p.add_argument("--init", choices=("caffe", "he"),
                   help="initialisation: caffe (the paper's, std 1e-4/0.01) or he (sqrt(2/fan_in)); "
                        "default caffe, he with --analog")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line (None means not given)."""
    out = {k: getattr(args, k) for k in _CONFIG_OPTIONS if getattr(args, k, None) is not None}
    if out.get("tiles") == UNTILED:
        out["tiles"] = None
    elif out.get("tiles") == BALANCED:
        out["tiles"] = balanced(out.get("dataset"), out.get("scheme"))
    if getattr(args, "enlarged", False):
        if "channels" in out:
            raise RapaError("give either --enlarged or --channels, not both")
        from rapa.models import ENLARGED_CHANNELS

        out["channels"] = tuple(ENLARGED_CHANNELS)
    return out


def balanced(dataset: str | None, scheme: str | None) -> tuple[int, ...]:
    """:func:`rapa.convert.balanced_tiles` of the paper's net on ``dataset`` (square numbers
    for the grid schemes)."""
    from rapa import schemes
    from rapa.config import TrainConfig, output_pixels
    from rapa.convert import balanced_tiles
    from rapa.data import dataset_info

    d = TrainConfig()
    try:
        info = dataset_info(dataset or d.dataset)
    except ValueError as exc:
        raise RapaError(str(exc)) from None
    return tuple(balanced_tiles(output_pixels(info.size), square=(scheme or d.scheme) in schemes.GRID_SCHEMES))


def config_from_args(args: argparse.Namespace):
    """A TrainConfig of the defaults overridden by the given options."""
    from rapa.config import TrainConfig

    return dataclasses.replace(TrainConfig(), **given_options(args))


def default_out(config) -> Path:
    tiles = "x".join(str(t) for t in config.tiles) if config.tiles and config.scheme != "none" else "untiled"
    scheme = "" if tiles == "untiled" else f"{config.scheme}-"
    return Path("runs") / f"{config.dataset}-{scheme}{tiles}-s{config.seed}"


def run(args: argparse.Namespace) -> int:
    from rapa.train import read_config, train

    if args.resume is not None:
        given = given_options(args)
        extra = sorted(set(given) - set(_RESUME_OK))
        if extra or args.out is not None or args.overwrite:
            bad = [f"--{k.replace('_', '-')}" for k in extra] + (["--out"] if args.out else []) \
                + (["--overwrite"] if args.overwrite else [])
            raise RapaError(f"--resume continues the saved config; {', '.join(bad)} cannot be changed "
                            f"(only {', '.join('--' + k.replace('_', '-') for k in _RESUME_OK)})")
        config = dataclasses.replace(read_config(args.resume), **given)
        out, resume = args.resume, True
        refuse_finished(out, config.epochs)
    else:
        config = config_from_args(args)
        config.validate()
        out, resume = (args.out if args.out is not None else default_out(config)), False
    output_folder(out, "--resume" if resume else "--out")
    apply_threads(args.threads)
    # with --json stdout carries the summary alone: the progress lines go to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        if not args.quiet:
            print(f"rapa train: {'resuming' if resume else 'run'} {out}")
        summary = train(config, out, resume=resume, progress=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def refuse_finished(run_dir: Path, epochs: int) -> None:
    """RapaError if ``run_dir`` already finished ``epochs`` epochs: resuming it would only
    evaluate it again (``rapa eval`` does that)."""
    try:
        done = json.loads((run_dir / "summary.json").read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(done, int) and done >= epochs:
        raise RapaError(f"{run_dir} is already finished ({done} epochs); give a larger --epochs to train it on "
                        f"(`rapa eval {run_dir}` evaluates it)")


def format_summary(s: dict[str, Any]) -> str:
    """The final summary of a run as a few lines of text (errors in percent)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    tiles = ",".join(map(str, s["tiles"])) if s.get("tiles") else "untiled"
    lines = [
        f"{s['dataset']}, {s['scheme']} {tiles}, {s['epochs']} epoch{'' if s['epochs'] == 1 else 's'}",
        f"  best test error (5-epoch average): {pct(s['best5_test_error'])} "
        f"(train {pct(s['best5_train_error'])}, epochs {s['best5_first_epoch']}-{s['best5_last_epoch']})",
        f"  final test error: single {pct(s['final_test_error'])}, {s['votes']}-vote {pct(s['vote_test_error'])}, "
        f"adaptive {pct(s['adaptive_test_error'])} ({s['adaptive_mean_passes']:.2f} passes/image)",
        f"  conv weights: {_num(s['conv_weights'], ',')}   theoretical analog speed-up: {s['analog_speedup']:g}x",
        f"  time: {s['wall_seconds']:.1f} s ({_num(s['images_per_s'], '.0f')} training images/s)",
    ]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
