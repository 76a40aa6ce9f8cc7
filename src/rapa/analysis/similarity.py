"""Filter similarity across tiles (paper §3.4, Fig. 6; SPEC §4).

For every tiled layer (a :class:`rapa.TiledConv2d` with more than one kernel matrix) and
every output channel, the Pearson correlation of the channel's flattened filter
``(cin*kh*kw,)`` between every pair of tiles is averaged; then the mean is taken over the
channels, and over the tiled layers for the overall figure. 1 means identical filters
(up to scale and offset), about 0 unrelated ones.

A filter that is constant (zero variance) has no correlation; pairs that involve one are
left out of the means (as ``numpy.corrcoef`` would give NaN for them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from rapa import rundir
from rapa.analysis.common import tiled_layers
from rapa.config import TrainConfig
from rapa.tiled_conv import tile_correlation  # the measure per channel; re-exported here

__all__ = ["filter_similarity", "plot_filters", "read_similarity", "save_similarity", "similarity_run",
           "tile_correlation"]


def filter_similarity(model: nn.Module) -> dict[str, Any]:
    """Similarity of the filters across tiles (SPEC §4) of every tiled layer and overall.

    Returns ``{"layers": {name: {"similarity", "tiles", "per_channel"}}, "overall": float}``,
    ``overall`` the mean over the tiled layers. RapaError "model has no tiled layer" if no
    layer holds more than one kernel matrix.
    """
    layers: dict[str, Any] = {}
    for name, layer in tiled_layers(model, require=True):
        per_channel = tile_correlation(layer.weight)  # (cout,)
        layers[name] = {"similarity": float(per_channel.nanmean()), "tiles": layer.num_kernels,
                        "per_channel": [float(v) for v in per_channel]}
    overall = float(torch.tensor([v["similarity"] for v in layers.values()], dtype=torch.float64).nanmean())
    return {"layers": layers, "overall": overall}


def similarity_run(model: nn.Module, config: TrainConfig | None = None,
                   run_dir: str | Path | None = None) -> dict[str, Any]:
    """The record of ``similarity.json``: :func:`filter_similarity` of ``model``, headed by
    the run it belongs to (``run_dir``, dataset, scheme, pooling, tiles of ``config``) as
    ``rapa similarity`` writes it; without ``config`` the measures alone, as the sweeps cache
    them. RapaError if no layer is tiled."""
    result = filter_similarity(model)
    if config is None:
        return result
    return {"run_dir": str(run_dir), "dataset": config.dataset, "scheme": config.scheme,
            "pooling": config.pooling, "tiles": list(config.tiles) if config.tiles else None, **result}


def save_similarity(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (:func:`similarity_run`) as ``folder``'s ``similarity.json``; returns its path."""
    return rundir.write_result(folder, "similarity", record)


def read_similarity(run_dir: str | Path, fresh: bool = False) -> dict[str, Any] | None:
    """The ``similarity.json`` of ``run_dir`` (None: none; ``fresh``: none newer than the
    run's checkpoint)."""
    return rundir.read_result(run_dir, "similarity", fresh=fresh)


def filter_grid(weight: Tensor, n_filters: int = 10, max_tiles: int = 16) -> Tensor:
    """Images ``(rows, cols, kh, kw, 3)`` in [0, 1] of the first ``n_filters`` filters of
    the first ``max_tiles`` tiles of ``weight`` ``(nk, cout, cin, kh, kw)``.

    RGB when ``cin == 3``, otherwise grey from input channel 0. Each column (one output
    channel across the tiles) shares one symmetric scale, 0.5 being a zero weight, so that
    filters of different tiles can be compared by eye.
    """
    if weight.dim() != 5:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: expected (nk, cout, cin, kh, kw)")
    w = weight.detach().to("cpu", torch.float32)[:max_tiles, :n_filters]  # (r, c, cin, kh, kw)
    w = w if w.shape[2] == 3 else w[:, :, :1].expand(-1, -1, 3, -1, -1)
    scale = w.abs().amax(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-12)  # (1, c, 1, 1, 1)
    return (0.5 + 0.5 * w / scale).permute(0, 1, 3, 4, 2).clamp(0, 1)  # (r, c, kh, kw, 3)


def plot_filters(weight: Tensor, path: str | Path, n_filters: int = 10, max_tiles: int = 16,
                 title: str | None = None) -> None:
    """Save a grid of filters (paper Fig. 6B/C): one row per tile, one column per output
    channel (the first ``n_filters``), as images; see :func:`filter_grid`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = filter_grid(weight, n_filters, max_tiles).numpy()  # (r, c, kh, kw, 3)
    rows, cols = grid.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.6 * cols + 0.8, 0.6 * rows + 0.6), squeeze=False)
    for r in range(rows):  # a handful of subplots, not pixels
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(grid[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"tile {r + 1}", fontsize=6)
            if r == 0:
                ax.set_title(f"f{c + 1}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
