"""``rapa similarity DIR``: similarity of the learned filters across tiles (paper Fig. 6).

Prints, for every tiled conv layer, the mean Pearson correlation between the tiles'
copies of each output channel's filter (averaged over channels), and the mean over the
tiled layers. Writes ``similarity.json`` and ``filters.png`` (the first tiled layer's
first filters, one row per tile, as in Fig. 6B/C) to ``--out`` (default: DIR).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapa.cli.common import add_threads, apply_threads, positive_int, run_output


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``similarity`` subcommand."""
    p = subparsers.add_parser("similarity", description=__doc__)
    p.add_argument("run_dir", type=Path, metavar="DIR", help="run directory written by rapa train")
    p.add_argument("--out", type=Path, default=None, help="folder for similarity.json and filters.png (default: DIR)")
    p.add_argument("--filters", type=int, default=10, help="filters (columns) shown in filters.png (default 10)")
    p.add_argument("--max-tiles", type=int, default=16, help="tiles (rows) shown in filters.png (default 16)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rapa.analysis.common import digital_twin, json_safe, tiled_layers
    from rapa.analysis.similarity import plot_filters, save_similarity, similarity_run
    from rapa.rundir import RESULT_PLOTS
    from rapa.train import load_run

    positive_int("--filters", args.filters)
    positive_int("--max-tiles", args.max_tiles)
    out = run_output(args.run_dir, args.out)
    apply_threads(args.threads)
    model, config, _ = load_run(args.run_dir, device="cpu")
    model = digital_twin(model)  # analog runs: the arrays' current weights
    result = similarity_run(model, config, args.run_dir)  # RapaError if nothing is tiled
    name, first = tiled_layers(model)[0]
    path = save_similarity(out, result)
    plot = out / RESULT_PLOTS["similarity"]
    plot_filters(first.weight, plot, args.filters, args.max_tiles,
                 title=f"{args.run_dir.name}: {name}, {config.scheme} tiling, {config.pooling} pooling")
    if args.json:
        print(json.dumps(json_safe(result), indent=1))
        return 0
    print(f"{args.run_dir}: {config.dataset}, {config.scheme} tiling, {config.pooling} pooling")
    for layer, res in result["layers"].items():
        print(f"  {layer:<6} {res['tiles']:>5} tiles   similarity {res['similarity']:.3f}")
    print(f"  overall similarity (mean over tiled layers): {result['overall']:.3f}")
    print(f"wrote {path.name} and {plot.name} to {out}")
    return 0
