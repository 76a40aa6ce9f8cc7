"""``rapa theory``: the implicit regulariser of replicated logistic regression (paper §3.5-3.6).

Trains a logistic regression whose parameters are replicated over ``nt`` tiles (random
replica at every access) and a single-parameter one with the same SGD budget on two classes
of scikit-learn's digits, prints their train/test errors and the regulariser ``R`` (exact or
Monte Carlo, and its second-order form), and writes ``theory.json`` and ``theory.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapa.cli.common import add_threads, apply_threads, output_folder, write_text
from rapa.errors import RapaError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``theory`` subcommand."""
    p = subparsers.add_parser("theory", description=__doc__)
    p.add_argument("--nt", type=int, default=16, help="replicas per parameter (default 16)")
    p.add_argument("--epochs", type=int, default=200, help="SGD epochs (default 200)")
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--classes", type=int, nargs=2, default=(1, 8), metavar=("A", "B"),
                   help="the two digits to separate (default 1 8)")
    p.add_argument("--n-train", type=int, default=30, help="training samples (default 30)")
    p.add_argument("--sampling", choices=("parameter", "tile"), default="parameter",
                   help="a replica per parameter (the paper's model, default) or one tile "
                        "per sample (as the RAPA layer)")
    p.add_argument("--out", type=Path, default=Path("runs/theory"),
                   help="output folder for theory.json and theory.png (default runs/theory)")
    add_threads(p)
    p.set_defaults(func=run)


def _table(result: dict) -> str:
    head = f"{'model':<22}{'train err':>10}{'test err':>10}{'gap':>8}" \
           f"{'train loss':>12}{'test loss':>11}{'R':>10}{'R 2nd-ord':>11}"
    nt = result["settings"]["nt"]
    rows = [("single", result["single"], 0.0, 0.0),
            (f"replicated nt={nt}", result["replicated"], result["R"], result["R_second_order"]),
            ("replicated, theta_bar", result["replicated_mean"], None, None)]
    lines = [head, "-" * len(head)]
    for name, m, r, r2 in rows:
        lines.append(f"{name:<22}{100 * m['train_error']:>9.2f}%{100 * m['test_error']:>9.2f}%"
                     f"{100 * m['error_gap_fraction']:>7.2f}%{m['train_loss']:>12.4f}{m['test_loss']:>11.4f}"
                     + (f"{r:>10.4f}{r2:>11.4f}" if r is not None else f"{'-':>10}{'-':>11}"))
    s = result["settings"]
    lines.append(f"digits {s['classes'][0]} vs {s['classes'][1]}, {s['n_train']} train / "
                 f"{s['n_test']} test, {s['sampling']} sampling; errors and losses of the "
                 f"replicated model are expectations over replica draws; R on the training "
                 f"set, {result['R_method']}")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    sp = result["spread"]
    ax[0].loglog(sp["scale"], sp["R"], "o", label=f"R ({result['R_method']})")
    ax[0].loglog(sp["scale"], sp["R_second_order"], "-", label="second order")
    ax[0].set_xlabel("replica spread (x trained deviations from theta_bar)")
    ax[0].set_ylabel("R (training set)")
    ax[0].set_title("Regulariser vs replica spread")
    ax[0].legend()
    nt = result["settings"]["nt"]
    for j, (key, label) in enumerate([("error", "error"), ("loss", "log-loss per sample")]):
        a = ax[1 + j]
        for model, color in [("single", "C0"), ("replicated", "C1")]:
            h = result["history"][model]
            name = "single" if model == "single" else f"replicated nt={nt}"
            a.plot(h["epoch"], h[f"train_{key}"], "--", color=color, label=f"{name} train")
            a.plot(h["epoch"], h[f"test_{key}"], "-", color=color, label=f"{name} test")
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        a.set_ylabel(label)
        a.set_title(f"Train/test {label}")
        a.legend()
    ax[1].set_ylim(0, 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the demonstration, print the table, write ``theory.json`` and ``theory.png``."""
    from rapa.theory import demo

    for name, value, low in [("--nt", args.nt, 1), ("--epochs", args.epochs, 1),
                             ("--n-train", args.n_train, 2)]:
        if value < low:
            raise RapaError(f"{name} must be >= {low}, got {value}")
    if args.lr <= 0:
        raise RapaError(f"--lr must be > 0, got {args.lr}")
    output_folder(args.out)
    apply_threads(args.threads)
    try:
        result = demo(nt=args.nt, epochs=args.epochs, lr=args.lr, seed=args.seed,
                      classes=tuple(args.classes), n_train=args.n_train, sampling=args.sampling)
    except ValueError as exc:
        raise RapaError(str(exc)) from None
    print(_table(result))
    write_text(args.out / "theory.json", json.dumps(result, indent=1))
    _plot(result, args.out / "theory.png")
    print(f"wrote {args.out / 'theory.json'} and {args.out / 'theory.png'}")
    return 0
