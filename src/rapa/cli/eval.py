"""``rapa eval DIR``: reload a run and report its test error, single, voting and adaptive voting.

With the run's own settings (its votes, threshold, seed and test images) it reports the
errors that ``rapa train`` wrote to the run's ``summary.json``: both draw the random tile
assignments from the run's seed. ``--json`` prints errors as fractions (keys ``*_error``).

``--read exact`` (analog runs) evaluates the arrays' weights read exactly, as a digital net
(no converters, read noise or output bounds): the difference to the default ``--read
analog`` is what reading the arrays costs, the rest of the gap to floating point is in the
weights the arrays learned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rapa.cli.common import add_quiet, add_threads, apply_threads, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", description=__doc__)
    p.add_argument("run_dir", type=Path, metavar="DIR", help="run directory written by rapa train")
    p.add_argument("--votes", type=int, default=None,
                   help="predictions per image for majority voting (default: the run's, 9)")
    p.add_argument("--threshold", type=float, default=None,
                   help="adaptive voting: confidence that needs no extra pass (default: the run's, 0.9)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--data-dir", help="folder holding the dataset files (default: the run's)")
    p.add_argument("--download", action="store_true", help="download missing dataset files")
    p.add_argument("--limit-test", type=int, help="evaluate only the first N test images (default: the run's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random tile assignments (default: the run's)")
    p.add_argument("--read", choices=("analog", "exact"), default="analog",
                   help="analog runs: read the arrays through their converters and noise (analog, the "
                        "default) or their weights exactly, as a digital net (exact)")
    add_threads(p)
    add_quiet(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (errors as fractions)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rapa.analysis.common import digital_twin
    from rapa.analysis.voting import evaluate_run
    from rapa.data import load_dataset
    from rapa.errors import RapaError
    from rapa.progress import shown
    from rapa.train import load_run

    positive_int("--votes", args.votes)
    positive_int("--limit-test", args.limit_test)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise RapaError(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.seed is not None and args.seed < 0:
        raise RapaError(f"--seed must be >= 0, got {args.seed}")
    apply_threads(args.threads)
    model, config, _ = load_run(args.run_dir, device=args.device)
    if args.read == "exact":
        if config.analog is None:
            raise RapaError(f"--read exact: {args.run_dir} was trained in floating point, not on analog "
                            "arrays; drop --read exact")
        model = digital_twin(model)  # the arrays' current weights in nn layers
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    limit = args.limit_test if args.limit_test is not None else config.limit_test
    data = load_dataset(config.dataset, "test", data_dir=config.data_dir, download=args.download, limit=limit)
    votes = config.votes if args.votes is None else args.votes
    threshold = config.adaptive_threshold if args.threshold is None else args.threshold
    with shown(not args.quiet):
        res = evaluate_run(model, config, data, votes, threshold, config.seed if args.seed is None else args.seed,
                           args.run_dir)
    if config.analog is not None:
        res["read"] = args.read
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    tiles = ",".join(map(str, config.tiles)) if config.tiles else "untiled"
    read = ""
    if config.analog is not None:
        read = f", {config.analog} arrays read {'exactly' if args.read == 'exact' else 'through their periphery'}"
    print(f"{args.run_dir}: {config.dataset} ({len(data)} test images), {config.scheme} {tiles}{read}")
    rows = (("single pass", res["single_error"], ""), (f"{votes}-vote majority", res["vote_error"], ""),
            ("adaptive vote", res["adaptive_error"],
             f" ({res['adaptive_mean_passes']:.2f} passes per image, at most {votes})"))
    for label, err, note in rows:
        print(f"  test error, {label + ':':<18}{100 * err:6.2f}%{note}")
    return 0
