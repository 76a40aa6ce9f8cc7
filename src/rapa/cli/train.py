"""``rapa train``: train the paper's ConvNet into a run directory (SPEC §3).

A new run: ``rapa train --dataset cifar10 --scheme random --tiles 16,4,1 --epochs 700
--out runs/c10-random``. Continue a stopped run: ``rapa train --resume runs/c10-random``
(the run's saved config is used; only the options of :data:`rapa.rundir.RESUMABLE_FIELDS`,
``--epochs``, ``--device``, ``--data-dir``, ``--download``, ``--votes``, ``--adaptive-threshold``,
``--eval-batch-size``, ``--eval-every``, and ``--lr`` may be given with it: a lower ``--lr`` is the
way on after a non-finite loss stopped a run). Train again into a folder that holds a run with ``--overwrite``
(the old run's files are deleted). ``--tiles balanced`` takes the fewest tiles per layer that
balance the layers' analog time (:func:`rapa.convert.balanced_tiles`; 16,4,1 on 32x32 images).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from rapa.cli.common import add_threads, apply_threads, list_type, output_folder
from rapa.config import TrainConfig, field_docs, output_pixels
from rapa.errors import RapaError
from rapa.models import LAYER_NAMES
from rapa.rundir import RESUMABLE_FIELDS, RESUME_OVERRIDES, read_summary

# with --resume only these config options may be given: the fields a resumed run may change
_RESUME_OK = RESUMABLE_FIELDS + RESUME_OVERRIDES

NOT_OPTIONS = ("version",)
"""TrainConfig fields without an option: ``version`` is the format of config.json, not a setting."""

BALANCED = "balanced"
"""``--tiles balanced``: :func:`rapa.convert.balanced_tiles` of the dataset's layer sizes."""


class _NoneGiven:
    """What ``none`` parses to for a field that may be None (None itself reads as "not given")."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneGiven()
"""``--FIELD none``: the field set to None (e.g. ``--limit-train none``: every image)."""


def tiles_arg(text: str) -> tuple[int, ...] | str:
    """``"16,4,1"`` -> ``(16, 4, 1)``; ``"balanced"`` -> :data:`BALANCED` (``none``: see :data:`NONE`)."""
    return BALANCED if text.strip().lower() == BALANCED else int_triple(text)


int_triple = list_type(int)
"""``"32,32,64"`` -> ``(32, 32, 64)`` (the length and the values are checked by TrainConfig.validate)."""

# What the command line adds to a field's option; the rest comes from the field's type
# (the parser), its docstring (the help) and its default (named in the help).
_SPECIAL: dict[str, dict[str, Any]] = {
    "tiles": {"type": tiles_arg, "extra": "e.g. 16,4,1; balanced = the fewest tiles that balance the layers' "
                                          "analog time"},
    "channels": {"type": int_triple, "extra": "e.g. 32,32,64"},
    "analog": {"metavar": "PRESET"},
    "init": {"metavar": "{caffe,he,lsuv}"},  # checked by TrainConfig.validate
    "tile_init": {"metavar": "{independent,replicate}"},  # checked by TrainConfig.validate
    "tile_lr_power": {"metavar": "P"},  # checked by TrainConfig.validate
    "layer_lr_scale": {"type": list_type(str, option="--layer-lr-scale"), "metavar": "LAYER=FACTOR,...",
                       "extra": "e.g. conv3=0.5,fc=0.5"},  # checked by TrainConfig.validate
    "digital_layers": {"type": list_type(str, option="--digital-layers", choices=LAYER_NAMES),
                       "metavar": "NAMES"},
    "analog_options": {"type": list_type(str, option="--analog-options"), "metavar": "FIELD=VALUE,...",
                       "extra": "e.g. desired_bl=100,out_noise=0; one layer's arrays: LAYER.FIELD=VALUE, "
                                "e.g. conv1.dw_min=0.0001"},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p.add_argument_group(
        "training config", "one option per field of rapa.config.TrainConfig (saved in the run's config.json)"))
    p.add_argument("--out", type=Path, help="run directory (default runs/DATASET-SCHEME-TILES-sSEED)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="train afresh into --out even if it holds a run (that run's files are deleted)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    add_threads(p)
    p.add_argument("--json", action="store_true",
                   help="print the final summary as one JSON document on stdout (progress goes to stderr)")
    p.set_defaults(func=run)


def config_options() -> dict[str, str]:
    """Field name -> its ``rapa train`` option, for every TrainConfig field but :data:`NOT_OPTIONS`."""
    return {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)
            if f.name not in NOT_OPTIONS}


def add_config_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One option per TrainConfig field (:func:`config_options`), made from the field: its type
    gives the parser (``none`` sets a field that may be None to None; a bool that may be None
    gets ``--FIELD/--no-FIELD``), its docstring the help, its default the help's last words.
    Every default is None (= the TrainConfig default, or not given with ``--resume``)."""
    docs = field_docs(TrainConfig)
    defaults = TrainConfig()
    options = config_options()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in options:
            continue
        special = dict(_SPECIAL.get(f.name, {}))
        default = getattr(defaults, f.name)
        kind, optional = _kind(f.type)
        kwargs: dict[str, Any] = {"default": None}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction if optional else "store_const"
            if not optional:
                kwargs["const"] = True
        else:
            parse = special.pop("type", None) or {"int": int, "float": float, "str": str, "tuple": int_triple}[kind]
            kwargs["type"] = _or_none(parse) if optional else parse
        kwargs.update({k: v for k, v in special.items() if k != "extra"})
        kwargs["help"] = option_help(docs[f.name], default, special.get("extra", ""), shown=kind != "bool")
        p.add_argument(options[f.name], **kwargs)
        if f.name == "channels":
            p.add_argument("--enlarged", action="store_true",
                           help="channels 54,64,64 (the paper's enlarged baseline is --enlarged --scheme none)")


def _kind(annotation: Any) -> tuple[str, bool]:
    """``("int" | "float" | "str" | "bool" | "tuple", may be None)`` of a field's annotation."""
    text = str(annotation).replace(" ", "")
    optional = "|None" in text or text.startswith("Optional[")
    base = text.replace("|None", "").removeprefix("Optional[").rstrip("]") if optional else text
    if base.startswith(("tuple[int", "tuple[str")):
        return "tuple", optional
    if base not in ("int", "float", "str", "bool"):
        raise TypeError(f"TrainConfig field of type {annotation!r} has no command-line parser; add one to _SPECIAL")
    return base, optional


def _or_none(parse):
    """``parse``, but ``none`` gives :data:`NONE`."""
    def parse_or_none(text: str):
        return NONE if text.strip().lower() == "none" else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names it in its error
    return parse_or_none


def option_help(doc: str, default: Any = None, extra: str = "", shown: bool = True) -> str:
    """A field's docstring as an option's help: reST markup removed, a ``field`` named as its
    option ``--field``, ``None`` as ``none`` (what the command line takes), then ``extra`` and
    ``(default X)`` when the default is not None (and ``shown``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], " ".join(doc.split()))
    text = re.sub(r"``([^`]+)``", lambda m: "--" + m.group(1).replace("_", "-") if m.group(1) in names
                  else m.group(1), text)
    text = re.sub(r"\bNone\b", "none", text).rstrip(".")
    if text[:1].isupper() and not text[1:2].isupper():
        text = text[0].lower() + text[1:]
    if extra:
        text += f"; {extra}"
    if shown and default is not None and default != ():
        value = ",".join(map(str, default)) if isinstance(default, tuple) else \
            format(default, "g") if isinstance(default, float) else str(default)
        text += f" (default {value})"
    return text.replace("%", "%%")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line (None means not given)."""
    out = {k: getattr(args, k) for k in config_options() if getattr(args, k, None) is not None}
    out = {k: None if v is NONE else v for k, v in out.items()}
    if out.get("tiles") == BALANCED:
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
    done = (read_summary(run_dir) or {}).get("epochs")
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
