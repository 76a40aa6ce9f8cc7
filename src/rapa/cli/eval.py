"""``rapa eval DIR``: reload a run and report its test error, single, voting and adaptive voting."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="test errors of a trained run: single pass, majority and adaptive vote",
                              description=__doc__)
    p.add_argument("run_dir", type=Path, metavar="DIR", help="run directory written by rapa train")
    p.add_argument("--votes", type=int, default=9, help="predictions per image for majority voting (default 9)")
    p.add_argument("--threshold", type=float, default=None,
                   help="adaptive voting: confidence that needs no extra pass (default: the run's, 0.9)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--data-dir", help="folder holding the dataset files (default: the run's)")
    p.add_argument("--limit-test", type=int, help="evaluate only the first N test images (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tile assignments (default 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rapa.cli.train import set_threads
    from rapa.data import load_dataset
    from rapa.errors import RapaError
    from rapa.train import evaluate, load_run

    set_threads(args.threads)
    if args.votes < 1:
        raise RapaError(f"--votes must be >= 1, got {args.votes}")
    model, config, _ = load_run(args.run_dir, device=args.device)
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    limit = args.limit_test if args.limit_test is not None else config.limit_test
    data = load_dataset(config.dataset, "test", data_dir=config.data_dir, limit=limit)
    threshold = config.adaptive_threshold if args.threshold is None else args.threshold
    torch.manual_seed(args.seed)
    res = evaluate(model, data, args.votes, config.device, config.eval_batch_size, threshold)
    res = {**res, "run_dir": str(args.run_dir), "dataset": config.dataset, "test_images": len(data)}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    tiles = ",".join(map(str, config.tiles)) if config.tiles else "untiled"
    print(f"{args.run_dir}: {config.dataset} ({len(data)} test images), {config.scheme} {tiles}")
    rows = (("single pass", res["single"], ""), (f"{args.votes}-vote majority", res["vote"], ""),
            ("adaptive vote", res["adaptive"],
             f" ({res['adaptive_passes']:.2f} passes per image, at most {args.votes})"))
    for label, err, note in rows:
        print(f"  test error, {label + ':':<18}{100 * err:6.2f}%{note}")
    return 0
