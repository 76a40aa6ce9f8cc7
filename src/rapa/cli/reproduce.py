"""``rapa reproduce --quick``: a reduced battery on Fashion-MNIST and the paper's claims, checked.

Trains every tiling scheme of Table 1 and the enlarged untiled net (the ``quick``
experiment, on Ray as ``rapa sweep`` does), then measures voting, filter similarity,
reduction and FGSM / EOT-FGSM robustness and writes ``REPORT.md``: each claim of the
paper next to the numbers, with a verdict (holds / does not hold / inconclusive)
computed from them. About 2 hours on 2 CPU cores; the budget options shrink it (e.g.
``--epochs 1 --limit-train 200 --limit-test 500`` for a smoke test of a few minutes).
Running it again skips the finished runs. The full battery is ``rapa sweep table1`` (and
table2, table3, fig5, fig6, fig7) followed by ``rapa report``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rapa.cli.sweep import add_budget_arguments, add_ray_arguments, budget


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``reproduce`` subcommand."""
    p = subparsers.add_parser("reproduce", help="the quick battery on Fashion-MNIST with the paper's claims checked",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced battery (the only one this command runs)")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce-quick"),
                   help="folder for the runs and REPORT.md (default runs/reproduce-quick)")
    add_ray_arguments(p)
    add_budget_arguments(p)
    p.add_argument("--attack-limit", type=int, default=5000, help="test images attacked per net (default 5000)")
    p.add_argument("--eot", type=int, default=8, help="random draws of the EOT attack (default 8)")
    p.add_argument("--device", default="auto", help="where the analyses run: auto, cpu, cuda (default auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rapa.analysis.common import positive_int
    from rapa.errors import RapaError
    from rapa.sweep.reproduce import reproduce_quick

    if not args.quick:
        raise RapaError("give --quick (the reduced battery); the full battery is `rapa sweep table1 --out DIR` "
                        "(and table2, table3, fig5, fig6, fig7 into the same DIR) then `rapa report DIR`")
    positive_int("--attack-limit", args.attack_limit)
    positive_int("--eot", args.eot)
    sweep_options = dict(address=args.address, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                         max_retries=args.max_retries, num_cpus=args.num_cpus)
    path = reproduce_quick(args.out, budget(args), args.data_dir, sweep_options, args.attack_limit, args.eot,
                           args.device)
    print(f"rapa reproduce: wrote {path}")
    return 0
