"""``rapa reduce DIR``: reduce a tiled net to one kernel matrix per layer (paper Table 3).

For every method (norm, random_tile, first_tile, random_filters, maxpool_winner; see
:mod:`rapa.analysis.reduce`) the reduced, untiled net is built and its test error
printed, with the best method and the tiled net's own single-pass error for comparison.
``maxpool_winner`` counts max-pooling wins on the training images (``--limit-train``);
conv3 (average pooling) falls back to ``norm``. Writes ``reduce.json`` to ``--out`` (errors
in percent: ``tiled_error_percent``, ``method_error_percent``, ``best_error_percent``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rapa.cli.common import add_quiet, add_threads, apply_threads, name_list, positive_int, run_output


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``reduce`` subcommand."""
    from rapa.analysis.reduce import METHODS

    p = subparsers.add_parser("reduce", description=__doc__)
    p.add_argument("run_dir", type=Path, metavar="DIR", help="run directory written by rapa train")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated filter selection methods (default all: {','.join(METHODS)})")
    p.add_argument("--limit-train", type=int, default=None,
                   help="training images for maxpool_winner's counts (default: the run's)")
    p.add_argument("--limit-test", type=int, default=None, help="test images (default: the run's)")
    p.add_argument("--batch-size", type=int, default=200, help="images per forward pass (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods and tile draws (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files (default: the run's)")
    p.add_argument("--download", action="store_true", help="download missing dataset files")
    p.add_argument("--out", type=Path, default=None, help="folder for reduce.json (default: DIR)")
    add_threads(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rapa.analysis.common import digital_twin, tiled_layers
    from rapa.analysis.reduce import METHODS, reduce_run, save_reduction
    from rapa.data import load_dataset
    from rapa.errors import RapaError
    from rapa.models import ConvNet
    from rapa.progress import shown
    from rapa.train import load_run

    methods = name_list("--methods", args.methods, METHODS)
    for option, value in (("--limit-train", args.limit_train), ("--limit-test", args.limit_test),
                          ("--batch-size", args.batch_size)):
        positive_int(option, value)
    out = run_output(args.run_dir, args.out)
    apply_threads(args.threads)
    model, config, _ = load_run(args.run_dir, device=args.device)
    model = digital_twin(model)  # analog runs: reduce the arrays' weights, evaluate digitally
    if not isinstance(model, ConvNet):
        raise RapaError(f"{args.run_dir} holds a {type(model).__name__}; reduce needs a digital ConvNet run")
    tiled_layers(model, require=True)  # RapaError "model has no tiled layer"
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    limit_train = args.limit_train if args.limit_train is not None else config.limit_train
    limit_test = args.limit_test if args.limit_test is not None else config.limit_test
    load = dict(data_dir=config.data_dir, download=args.download)
    test = load_dataset(config.dataset, "test", limit=limit_test, **load)
    train = load_dataset(config.dataset, "train", limit=limit_train, **load) if "maxpool_winner" in methods else None

    with shown(not args.quiet):
        result = reduce_run(model, config, test, train, methods, args.seed, args.batch_size, args.run_dir)
    tiled_error = result["tiled_error"]
    path = save_reduction(out, result)

    tiles = ",".join(map(str, config.tiles)) if config.tiles else "untiled"
    print(f"{args.run_dir}: {config.dataset} ({len(test)} test images), {config.scheme} tiling {tiles}, "
          f"{config.pooling} pooling")
    labels = {"": "tiled net (1 pass)", **{m: f"reduced, {m}" for m in result["methods"]}}
    width = max(map(len, labels.values()))
    print(f"  {labels['']:<{width}}  {tiled_error:6.2f}%   (test error)")
    for method, error in result["methods"].items():
        mark = "  <- best" if method == result["best_method"] else ""
        print(f"  {labels[method]:<{width}}  {error:6.2f}%{mark}")
    print(f"wrote {path.name} to {out}")
    return 0
