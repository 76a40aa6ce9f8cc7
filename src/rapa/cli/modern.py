"""``rapa modern``: RAPA beyond the paper, a residual and a depthwise-separable net (issue 17).

For each net (``resnet``, ``separable``) and seed it trains the untiled net and the same net
converted with ``rapa.convert(net, tiles="balanced", scheme="random")`` on Fashion-MNIST
(SGD with momentum, cosine learning rate, weight decay, minibatch 64, moderate augmentation),
``--jobs`` runs at a time with one thread each, then writes ``summary.md`` / ``summary.json``
to ``--out``: test error of one pass and of a 9-vote majority with 95% intervals, and the
run-time model's speed-up (:mod:`rapa.modern`). A run whose ``run.json`` exists is skipped,
so an interrupted command goes on where it stopped; ``scripts/modern-fmnist.sh`` is the
demonstration's command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rapa.cli.common import output_folder, positive_int
from rapa.errors import RapaError

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``modern`` subcommand."""
    p = subparsers.add_parser("modern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/modern"), help="folder of the runs and summary")
    p.add_argument("--nets", nargs="+", metavar="NET", help="nets to train: resnet, separable (default both)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--limit-train", type=int, default=None, help="training images (default all)")
    p.add_argument("--limit-test", type=int, default=None, help="test images (default all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options and the output folder, train the missing runs, print the summary."""
    from rapa.modern import NET_NAMES, run_all

    nets = args.nets or list(NET_NAMES)
    unknown = [n for n in nets if n not in NET_NAMES]
    if unknown:
        raise RapaError(f"--nets: unknown {', '.join(unknown)}; choose among {', '.join(NET_NAMES)}")
    for name in ("epochs", "jobs", "limit_train", "limit_test"):
        positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if any(s < 0 for s in args.seeds):
        raise RapaError(f"--seeds must be >= 0, got {' '.join(map(str, args.seeds))}")
    if not args.lr > 0:
        raise RapaError(f"--lr must be > 0, got {args.lr}")
    output_folder(args.out)
    command = (f"rapa modern --out {args.out} --nets {' '.join(nets)} --seeds {' '.join(map(str, args.seeds))} "
               f"--epochs {args.epochs} --lr {args.lr:g} --jobs {args.jobs}"
               + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("limit_train", "limit_test")
                         if getattr(args, k) is not None))
    print(run_all(args.out, nets, args.seeds, args.epochs, args.lr, args.limit_train, args.limit_test,
                  args.jobs, command, say=lambda line: print(line, flush=True)))
    return 0
