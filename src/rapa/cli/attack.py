"""``rapa attack DIR --baseline DIR2``: adversarial robustness against SNR (paper Fig. 7).

Attacks the test images each net classifies correctly with FGSM at every ``--snr``
(dB, ``20 log10(||x|| / ||delta||)`` on the pixel-space images, as a person sees them;
``--normalised-snr``: on the normalised model inputs, as rapa did before), and for a randomly tiled
net also with EOT-FGSM and EOT-PGD (see :mod:`rapa.analysis.attack`). Prints the
accuracy at 33 dB (the threshold of human perception; interpolated) and, with a
baseline, the gap reduction ``(acc - acc_base) / (100 - acc_base)`` per attack. Writes
``attack.json`` (accuracies in percent in keys ``*_percent``, the gap reduction as ``gap_reduction_fraction``)
and ``attack.png`` to ``--out`` (default: DIR). PGD costs
``steps * eot`` passes per SNR: use ``--limit`` on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from rapa.cli.common import add_quiet, add_threads, apply_threads, float_list, name_list, positive_int, run_output


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attack`` subcommand."""
    from rapa.analysis.attack import ATTACKS, DEFAULT_SNRS

    p = subparsers.add_parser("attack", description=__doc__)
    p.add_argument("run_dir", type=Path, metavar="DIR", help="run directory of the (tiled) net")
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR2",
                   help="run directory of the baseline (untiled) net, for the gap reduction")
    p.add_argument("--snr", default=",".join(f"{s:g}" for s in DEFAULT_SNRS),
                   help="comma-separated SNRs in dB (default 10,15,...,50)")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help=f"comma-separated attacks (default {','.join(ATTACKS)})")
    p.add_argument("--eot", type=int, default=8, help="random draws averaged by the EOT attacks (default 8)")
    p.add_argument("--normalised-snr", action="store_true",
                   help="measure the SNR on the normalised model inputs instead of the pixel-space images")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default 10, step 2.5*eps/steps)")
    p.add_argument("--limit", type=int, default=None, help="attack only the first N test images (default: the run's)")
    p.add_argument("--batch-size", type=int, default=100, help="images per attack batch (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tile draws and PGD starts (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files (default: the run's)")
    p.add_argument("--download", action="store_true", help="download missing dataset files")
    p.add_argument("--out", type=Path, default=None, help="folder for attack.json and attack.png (default: DIR)")
    add_threads(p)
    add_quiet(p)
    p.set_defaults(func=run)


def _snrs(option: str, text: str) -> tuple[float, ...]:
    """The SNRs (dB) of ``option``: comma-separated numbers in :data:`rapa.analysis.attack.SNR_RANGE`."""
    from rapa.analysis.attack import check_snrs
    from rapa.errors import RapaError

    try:
        return check_snrs(float_list(option, text, unit="dB"))
    except ValueError as exc:
        raise RapaError(f"{option}: {exc}") from None


def _pct(value: float, digits: int = 2) -> str:
    """``12.34%`` right-aligned, or a dash for a value that was not measured (NaN)."""
    return f"{'-':>{digits + 4}} " if math.isnan(value) else f"{value:{digits + 4}.{digits}f}%"


def _label(run_dir: Path, config) -> str:
    tiles = ",".join(map(str, config.tiles)) if config.tiles else "untiled"
    return f"{run_dir.name} ({config.scheme} {tiles})" if config.tiles else f"{run_dir.name} (untiled)"


def run(args: argparse.Namespace) -> int:
    from rapa.analysis.attack import (ATTACKS, HUMAN_THRESHOLD_DB, attack_record, attack_runs, plot_robustness,
                                      save_attack, threshold_accuracies)
    from rapa.data import load_dataset
    from rapa.errors import RapaError
    from rapa.progress import shown
    from rapa.rundir import RESULT_PLOTS
    from rapa.train import load_run

    snrs = _snrs("--snr", args.snr)
    attacks = name_list("--attacks", args.attacks, ATTACKS)
    for option, value in (("--eot", args.eot), ("--pgd-steps", args.pgd_steps), ("--limit", args.limit),
                          ("--batch-size", args.batch_size)):
        positive_int(option, value)
    out = run_output(args.run_dir, args.out)
    apply_threads(args.threads)
    model, config, _ = load_run(args.run_dir, device=args.device)
    runs = [("model", args.run_dir, model, config)]
    if args.baseline is not None:
        base, base_config, _ = load_run(args.baseline, device=args.device)
        if base_config.dataset != config.dataset:
            raise RapaError(f"--baseline {args.baseline} was trained on {base_config.dataset}, "
                            f"{args.run_dir} on {config.dataset}")
        runs.append(("baseline", args.baseline, base, base_config))
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    limit = args.limit if args.limit is not None else config.limit_test
    test = load_dataset(config.dataset, "test", data_dir=config.data_dir, download=args.download,
                        limit=limit)

    from rapa.data import dataset_info

    info = dataset_info(config.dataset)
    pixel = None if args.normalised_snr else (info.mean, info.std)
    labels = {key: _label(Path(run_dir), cfg) for key, run_dir, _, cfg in runs}
    with shown(not args.quiet):
        curves = attack_runs({key: net for key, _, net, _ in runs}, test, snrs, attacks, eot=args.eot,
                             pgd_steps=args.pgd_steps, batch_size=args.batch_size, seed=args.seed, pixel=pixel)
    at = threshold_accuracies(curves, attacks)
    path = save_attack(out, attack_record(curves, at, args.run_dir, config.dataset, len(test), args.baseline,
                                          labels))
    plot = out / RESULT_PLOTS["robustness"]
    plot_robustness({labels[k]: c for k, c in curves.items()}, plot)

    print(f"{config.dataset}, first {len(test)} test images, SNR {', '.join(f'{s:g}' for s in snrs)} dB")
    for key, c in curves.items():
        print(f"  {labels[key]}: {c['correct']} correct before the attack ({c['clean_accuracy']:.2f}%)"
              + (f", EOT over {c['eot']} draws" if c["stochastic"] else ", deterministic"))
    if not min(snrs) <= HUMAN_THRESHOLD_DB <= max(snrs):
        print(f"accuracy at {HUMAN_THRESHOLD_DB:g} dB: not measured (the SNRs {min(snrs):g}-{max(snrs):g} dB "
              f"do not reach it; give --snr values on both sides of it)")
        at = {}
    else:
        print(f"accuracy at {HUMAN_THRESHOLD_DB:g} dB" + (" and gap reduction" if "baseline" in curves else "")
              + " (- where no image was classified correctly to begin with):")
    for attack, row in at.items():
        line = f"  {attack:<9} {labels['model']}: {_pct(row['model'])}"
        if "baseline" in row:
            line += f"   baseline: {_pct(row['baseline'])}   gap reduction {_pct(100 * row['gap_reduction_fraction'], 1)}"
        print(line)
    print(f"wrote {path.name} and {plot.name} to {out}")
    return 0
