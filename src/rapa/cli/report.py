"""``rapa report DIR``: the paper's tables (Markdown, CSV) and figures from a sweep folder.

DIR may also be the results tree of ``rapa reproduce`` (it holds ``battery.json``): then
REPORT.md and claims.json are rebuilt there from its small files alone. Otherwise reads
every run in DIR (finished or not) and writes ``report.md``, ``table1.csv``,
``table2.csv``, ``table3.csv``, ``fig5.csv``/``fig5.png``, ``fig6a.csv``/``fig6a.png``
and ``fig7.csv``/``fig7-DATASET.png`` to ``--out`` (default DIR/report), from whatever
runs have finished; missing cells read "–". Table 3 and Figure 7 need the reduction and
the attacks of the nets: they are computed here (cached in each run directory as
``reduce.json`` / ``attack.json``, the files ``rapa reduce`` and ``rapa attack`` write),
unless ``--no-analysis``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rapa.cli.common import add_threads, apply_threads, output_folder, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser("report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path, metavar="DIR", help="sweep folder written by rapa sweep")
    p.add_argument("--out", type=Path, help="folder for report.md, CSVs and figures (default DIR/report)")
    p.add_argument("--no-analysis", action="store_true",
                   help="do not compute reductions and attacks; use only the cached reduce.json / attack.json")
    p.add_argument("--attack-limit", type=int, help="attack the first N test images (default: the run's test set)")
    p.add_argument("--eot", type=int, default=8, help="random draws of the EOT attack (default 8)")
    p.add_argument("--reduce-train-limit", type=int, default=10000,
                   help="training images counted by the maxpool_winner reduction (default 10000)")
    p.add_argument("--device", default="auto", help="where the analyses run: auto, cpu, cuda (default auto)")
    p.add_argument("--quiet", action="store_true", help="print only where the report is")
    add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rapa.config import resolve_device
    from rapa.sweep.report import build_report, check_sweep_dir
    from rapa.sweep.analyses import Analyses

    for option, value in (("--attack-limit", args.attack_limit), ("--eot", args.eot),
                          ("--reduce-train-limit", args.reduce_train_limit)):
        positive_int(option, value)
    from rapa.sweep.battery_report import MANIFEST, write_battery_report

    if (args.sweep_dir / MANIFEST).is_file():  # the results tree of `rapa reproduce`: REPORT.md from its files
        path = write_battery_report(args.sweep_dir, log=None if args.quiet else print)
        print(f"rapa report: wrote {path} and {path.with_name('claims.json')}")
        return 0
    check_sweep_dir(args.sweep_dir)
    output_folder(args.out if args.out is not None else args.sweep_dir / "report")
    apply_threads(args.threads)
    device = str(resolve_device(args.device))
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    analyses = Analyses(compute=not args.no_analysis, device=device, attack_limit=args.attack_limit,
                        reduce_train_limit=args.reduce_train_limit, eot=args.eot, log=log)
    from rapa.progress import shown

    with shown(not args.quiet):  # bars for the attacks and reductions it computes
        report = build_report(args.sweep_dir, args.out, analyses, log=log)
    if not args.quiet:
        print(report.markdown)
    print(f"rapa report: wrote {len(report.files)} files to {report.files[0].parent}")
    return 0
