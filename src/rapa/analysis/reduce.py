"""Reduction of a tiled network to one kernel matrix per layer (paper §3.4.3, Table 3; SPEC §4).

Per conv layer and output channel one tile's filter (and that tile's bias) is kept; the
result is the untiled :class:`rapa.models.ConvNet` (scheme ``none``) with the same
channels, pooling and fully connected layer. Methods choose the tile per channel:

* ``norm``: the tile whose filter has the largest L2 norm (weights only, not the bias).
* ``random_tile``: one random tile for the whole layer.
* ``first_tile``: tile 0.
* ``random_filters``: an independent random tile for every channel.
* ``maxpool_winner``: the tile that most often wins max pooling on the given (training)
  images: the net runs in evaluation mode with recorded tile assignments; for every
  pooling region of a layer followed by max (or mixed, whose max part is used) pooling,
  the argmax pixel's tile gets a count for that channel. Regions whose maximum is <= 0
  (all zero after the ReLU) decide nothing and are not counted. Layers followed by
  average or stochastic pooling (always conv3, whose pool is average) fall back to ``norm``,
  as do channels that never won a counted region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rapa import rundir, schemes
from rapa.analysis.common import iter_batches, model_device, tiled_layers
from rapa.config import TrainConfig
from rapa.errors import RapaError
from rapa.models import ConvNet
from rapa.pooling import MixedPool2d
from rapa.tiled_conv import TiledConv2d

__all__ = ["METHODS", "REDUCE_FILE_KEYS", "choose_tiles", "classification_error", "maxpool_win_counts",
           "read_reduction", "reduce", "reduce_errors", "reduce_run", "save_reduction"]

METHODS: tuple[str, ...] = ("norm", "random_tile", "first_tile", "random_filters", "maxpool_winner")
REDUCE_FILE_KEYS = {"tiled_error": "tiled_error_percent", "methods": "method_error_percent",
                    "best_error": "best_error_percent"}
"""How ``reduce.json`` names the errors (percent) of :func:`reduce_errors` and the tiled net's
(:func:`rapa.analysis.common.file_keys`; files written before read the same)."""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, high, size, generator=generator,
                         device=generator.device if generator is not None else "cpu")


def choose_tiles(layer: TiledConv2d, method: str, generator: torch.Generator | None = None,
                 counts: Tensor | None = None) -> Tensor:
    """Tile chosen for every output channel ``(cout,)`` of ``layer`` by ``method``.

    ``counts`` ``(cout, nk)`` are the max-pooling wins of ``maxpool_winner``; without them
    (or for channels that never won) the method falls back to ``norm``.
    """
    _check_method(method)
    nk, cout = layer.weight.shape[:2]
    dev = layer.weight.device
    norm_choice = layer.weight.detach().flatten(2).norm(dim=2).argmax(0)  # (cout,)
    if nk == 1 or method == "first_tile":
        return torch.zeros(cout, dtype=torch.long, device=dev)
    if method == "norm":
        return norm_choice
    if method == "random_tile":
        return _randint(nk, (1,), generator).to(dev).expand(cout).clone()
    if method == "random_filters":
        return _randint(nk, (cout,), generator).to(dev)
    if counts is None:  # maxpool_winner where no max pooling follows the layer
        return norm_choice
    if counts.shape != (cout, nk):
        raise ValueError(f"counts of shape {tuple(counts.shape)}: expected ({cout}, {nk})")
    counts = counts.to(dev)
    return torch.where(counts.sum(1) > 0, counts.argmax(1), norm_choice)


def _max_pool_of(pool: nn.Module) -> tuple | None:
    """``(kernel_size, stride, padding)`` of a max or mixed pool, None for other kinds."""
    if isinstance(pool, nn.MaxPool2d):
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
            return None
        return pool.kernel_size, pool.stride, pool.padding
    if isinstance(pool, MixedPool2d):
        return pool.kernel_size, pool.stride, pool.padding
    return None


def _tile_map(index: Tensor | None, np_: int, device: torch.device) -> Tensor:
    """Tile of every output pixel ``(B or 1, np)``; one kernel everywhere when ``index`` is None."""
    if index is None:
        return torch.zeros(1, np_, dtype=torch.long, device=device)
    return schemes.index_to_tile_map(index, np_)  # (B or 1, np)


@torch.no_grad()
def maxpool_win_counts(model: ConvNet, data: Any, batch_size: int = 200,
                       limit: int | None = None) -> list[Tensor | None]:
    """Max-pooling wins per conv layer: ``(cout, nk)`` counts, or None for a layer not
    followed by max/mixed pooling (pool3 is always average).

    Runs ``model`` in evaluation mode on ``data`` (see :func:`rapa.analysis.common.iter_batches`).
    Each conv layer's tile assignment is drawn with :meth:`rapa.TiledConv2d.assignment`,
    recorded and handed to the layer (a forward pre-hook), its output kept (a forward
    hook); then, per channel, the tile of the argmax pixel of every pooling region whose
    maximum is positive gets a count.
    """
    if not isinstance(model, ConvNet):
        raise ValueError(f"model of type {type(model).__name__}: maxpool_winner needs a rapa ConvNet")
    convs, pools = model.convs, (model.pool1, model.pool2, model.pool3)
    dev = model_device(model)
    counts: list[Tensor | None] = [
        torch.zeros(conv.out_channels * conv.num_kernels, dtype=torch.long, device=dev)
        if _max_pool_of(pool) is not None else None for conv, pool in zip(convs, pools)]
    if all(c is None for c in counts):
        return counts
    index: dict[int, Tensor | None] = {}
    out: dict[int, Tensor] = {}

    def record_index(j: int):
        def hook(layer: TiledConv2d, args: tuple) -> tuple:
            x = args[0]
            given = args[1] if len(args) > 1 else None
            index[j] = layer.assignment(x) if given is None else given  # (B or 1, nt, M) or None
            return (x, index[j])
        return hook

    handles = [conv.register_forward_pre_hook(record_index(j)) for j, conv in enumerate(convs)]
    handles += [conv.register_forward_hook(lambda m, a, o, j=j: out.__setitem__(j, o)) for j, conv in enumerate(convs)]
    was_training = model.training
    model.eval()
    try:
        for x, _ in iter_batches(data, batch_size, dev, limit, desc="maxpool_winner: counting wins"):
            model(x)
            for j, (conv, pool, count) in enumerate(zip(convs, pools, counts)):
                geom = _max_pool_of(pool)
                if geom is None or count is None:
                    continue
                a = F.relu(out[j])  # (N, cout, oh, ow) what the pool sees
                n, cout, oh, ow = a.shape
                peak, arg = F.max_pool2d(a, *geom, return_indices=True)  # (N, cout, ph, pw) each
                s_map = _tile_map(index[j], oh * ow, a.device).expand(n, -1)  # (N, np)
                won = s_map.gather(1, arg.flatten(1)).view_as(arg)  # (N, cout, ph, pw) tile of each winner
                ok = (peak > 0) & (won >= 0)  # (N, cout, ph, pw)
                channel = torch.arange(cout, device=a.device).view(1, cout, 1, 1)
                slot = (channel * conv.num_kernels + won.clamp_min(0))[ok]  # (wins,)
                count.index_add_(0, slot, torch.ones_like(slot))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [None if c is None else c.view(conv.out_channels, conv.num_kernels) for c, conv in zip(counts, convs)]


@torch.no_grad()
def reduce(model: ConvNet, method: str, data: Any = None, generator: torch.Generator | None = None,
           batch_size: int = 200, limit: int | None = None) -> ConvNet:
    """The untiled ConvNet (scheme ``none``) made of one chosen filter per channel and layer.

    ``method`` is one of :data:`METHODS`; ``data`` (training images, see
    :func:`rapa.analysis.common.iter_batches`) is needed by ``maxpool_winner`` only,
    ``limit`` caps how many of them are used; ``generator`` drives the random methods.
    Every other parameter (pooling, FC) is copied. The result is in evaluation mode if
    ``model`` is, on the same device. RapaError "model has no tiled layer" if there is
    nothing to reduce.
    """
    _check_method(method)
    if not isinstance(model, ConvNet):
        raise ValueError(f"model of type {type(model).__name__}: reduce needs a rapa ConvNet")
    tiled_layers(model, require=True)
    counts: list[Tensor | None] = [None, None, None]
    if method == "maxpool_winner":
        if data is None:
            raise ValueError("method='maxpool_winner' needs data (training images)")
        counts = maxpool_win_counts(model, data, batch_size, limit)

    state = {k: v for k, v in model.state_dict().items() if not k.endswith("fixed_seed")}
    for j, conv in enumerate(model.convs):
        choice = choose_tiles(conv, method, generator, counts[j])  # (cout,)
        channel = torch.arange(conv.out_channels, device=choice.device)
        state[f"conv{j + 1}.weight"] = conv.weight.detach()[choice, channel].unsqueeze(0).clone()  # (1, cout, cin, kh, kw)
        if conv.bias is not None:
            state[f"conv{j + 1}.bias"] = conv.bias.detach()[choice, channel].unsqueeze(0).clone()  # (1, cout)
    reduced = ConvNet(num_classes=model.num_classes, in_channels=model.in_channels, channels=model.channels,
                      tiles=None, scheme="none", pooling=model.pooling, image_size=model.image_size,
                      device="meta")  # no initialisation drawn: every tensor comes from ``state``
    reduced.load_state_dict(state, assign=True)
    reduced.generator = model.generator
    for new, old in ((reduced.pool1, model.pool1), (reduced.pool2, model.pool2)):
        if hasattr(old, "generator"):
            new.generator = old.generator
    reduced.train(model.training)
    return reduced


def reduce_errors(model: ConvNet, test_data: Any, methods: tuple[str, ...] = METHODS, train_data: Any = None,
                  generator: torch.Generator | None = None, batch_size: int = 200,
                  train_limit: int | None = None) -> dict[str, Any]:
    """Test error (percent) of the reduced net for every method, and the best (Table 3).

    ``test_data``/``train_data`` as in :func:`rapa.analysis.common.iter_batches` (with
    labels); ``train_data`` feeds ``maxpool_winner``. Returns ``{"methods": {m: error},
    "best_method", "best_error"}``.
    """
    errors: dict[str, float] = {}
    for method in methods:
        reduced = reduce(model, method, train_data, generator, batch_size, train_limit)
        errors[method] = classification_error(reduced, test_data, batch_size, desc=f"reduced, {method}")
    best = min(errors, key=errors.__getitem__)
    return {"methods": errors, "best_method": best, "best_error": errors[best]}


@torch.no_grad()
def classification_error(model: nn.Module, data: Any, batch_size: int = 200, desc: str | None = None) -> float:
    """Test error in percent of one evaluation-mode pass per image (``desc``: progress bar label)."""
    was_training = model.training
    model.eval()
    wrong = total = 0
    try:
        for x, y in iter_batches(data, batch_size, model_device(model), desc=desc):
            if y is None:
                raise ValueError("data without labels: an error needs (x, y)")
            wrong += int((model(x).argmax(1) != y).sum())
            total += y.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise RapaError("no test images")
    return 100.0 * wrong / total


def reduce_run(model: ConvNet, config: TrainConfig, test_data: Any, train_data: Any = None,
               methods: tuple[str, ...] = METHODS, seed: int = 0, batch_size: int = 200,
               run_dir: str | Path | None = None) -> dict[str, Any]:
    """Table 3 for the run ``run_dir`` (trained with ``config``): the tiled net's error and
    :func:`reduce_errors`, with the tile draws and random methods seeded by ``seed``.
    Returns the record of ``reduce.json`` (errors in percent, rapa's own keys:
    :func:`save_reduction` spells them as the file does)."""
    torch.manual_seed(seed)
    tiled_error = classification_error(model, test_data, batch_size, desc="tiled net")
    result = reduce_errors(model, test_data, methods, train_data, torch.Generator().manual_seed(seed), batch_size)
    return {"run_dir": str(run_dir), "dataset": config.dataset, "scheme": config.scheme,
            "pooling": config.pooling, "tiles": list(config.tiles) if config.tiles else None,
            "test_images": len(test_data), "train_images": None if train_data is None else len(train_data),
            "tiled_error": tiled_error, **result}


def save_reduction(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (:func:`reduce_run`) as ``folder``'s ``reduce.json``; returns its path."""
    return rundir.write_result(folder, "reduction", record, REDUCE_FILE_KEYS)


def read_reduction(run_dir: str | Path, fresh: bool = False) -> dict[str, Any] | None:
    """The ``reduce.json`` of ``run_dir`` with rapa's own keys (None: none; ``fresh``: none
    newer than the run's checkpoint)."""
    return rundir.read_result(run_dir, "reduction", REDUCE_FILE_KEYS, fresh)
