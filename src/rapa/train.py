"""Training the paper's ConvNet (SPEC §3): SGD recipe, run directories, resume, evaluation.

>>> from rapa.config import TrainConfig
>>> summary = train(TrainConfig(dataset="digits", epochs=2, limit_train=200), "runs/quick")
>>> model, config, summary = load_run("runs/quick")

A run directory (:mod:`rapa.rundir`) holds the resolved config, one metrics row per epoch,
the checkpoint (rewritten atomically after every epoch: model, optimizer, epoch, RNG
states, metrics) and, at the end, the summary. ``train(..., resume=True)`` continues from
the checkpoint; on CPU with the same seed the final weights are bit-identical to those of
an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rapa import __version__, analog, rundir
from rapa.checkpoint import load_checkpoint, save_checkpoint
from rapa.config import TrainConfig, output_pixels, resolve_device
from rapa.data import BatchLoader, DatasetInfo, ImageData, dataset_info, load_dataset, make_loader
from rapa.errors import RapaError
from rapa.lsuv import LSUV_IMAGES, lsuv_
from rapa.models import ConvNet
from rapa.ops.native import describe as describe_native
from rapa.progress import shown, track
from rapa.rundir import METRIC_FIELDS, TRAIN_FILES as RUN_FILES, read_config
from rapa.runtime import analog_speedup
from rapa.tile_rates import scale_tile_rates
from rapa.tiled_conv import TiledConv2d, TiledConvBase
from rapa.voting import adaptive_vote, majority_vote

__all__ = ["METRIC_FIELDS", "RUN_FILES", "analog_speedup", "best_moving_average", "evaluate", "load_run",
           "lr_at", "make_model_and_optimizer", "read_config", "single_pass_error", "train"]
# METRIC_FIELDS, RUN_FILES, read_config: re-exported from rapa.rundir; analog_speedup from rapa.runtime

CHECKPOINT_FORMAT = 1
_DATA_SEED_OFFSET = 2**32  # the data order/augmentation stream is seeded apart from the model's


# ---------------------------------------------------------------- recipe and reporting


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): ``lr / warmup_divisor`` during the warm-up
    epochs, then ``lr * gamma ** (epoch // lr_step)`` (steps counted from epoch 0)."""
    lr = config.resolved_lr()
    if epoch < config.warmup_epochs:
        return lr / config.warmup_divisor
    return lr * config.gamma ** (epoch // config.lr_step)


def best_moving_average(test_errors: Sequence[float], train_errors: Sequence[float],
                        window: int = 5) -> dict[str, Any]:
    """The paper's figure (SPEC §3): the best test error averaged over ``window``
    consecutive epochs, and the train error averaged over the same epochs.

    Epochs whose test error was not measured (NaN) are skipped; with fewer than
    ``window`` measured epochs the window is all of them. Returns ``test_error``,
    ``train_error`` and the window's ``first_epoch`` and ``last_epoch`` (1-based); ties go
    to the earliest window. All None when nothing was measured.
    """
    measured = [i for i, e in enumerate(test_errors) if not math.isnan(e)]
    if not measured:
        return {"test_error": None, "train_error": None, "first_epoch": None, "last_epoch": None}
    w = min(window, len(measured))
    best: dict[str, Any] = {}
    for end in range(w - 1, len(measured)):
        idx = measured[end - w + 1:end + 1]
        test = math.fsum(test_errors[i] for i in idx) / w
        if not best or test < best["test_error"]:
            best = {"test_error": test, "train_error": math.fsum(train_errors[i] for i in idx) / w,
                    "first_epoch": idx[0] + 1, "last_epoch": idx[-1] + 1}
    return best


def make_model_and_optimizer(config: TrainConfig, info: DatasetInfo, device: torch.device | str,
                             train_data: ImageData | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The ConvNet of ``config`` on ``device`` and its plain SGD optimizer (rate of epoch 0).

    Weight decay is :meth:`TrainConfig.resolved_weight_decay` (torch's, 1e-4 by default).
    With init ``lsuv`` the He-initialised net is rescaled on the first
    :data:`rapa.lsuv.LSUV_IMAGES` images of ``train_data`` (:func:`rapa.lsuv.lsuv_`; without
    ``train_data``, as when a checkpoint's weights are loaded next, it stays He's).
    With ``config.analog`` the model and optimizer are then handed to
    :func:`rapa.analog.prepare`, which returns their analog versions.
    """
    init = config.resolved_init()
    model = ConvNet(num_classes=info.num_classes, in_channels=info.in_channels, channels=tuple(config.channels),
                    tiles=config.tiles, scheme=config.scheme, pooling=config.pooling, image_size=info.size,
                    device=device, init="he" if init == "lsuv" else init, tile_init=config.resolved_tile_init())
    if init == "lsuv" and train_data is not None:
        images, _ = next(iter(make_loader(train_data, min(LSUV_IMAGES, len(train_data)), device=device)))
        lsuv_(model, images)  # (n, C, H, W) normalised as in training, not augmented
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(config, 0), momentum=config.momentum,
                                weight_decay=config.resolved_weight_decay())
    if config.analog is not None:
        analog.require_aihwkit()  # one line naming the extra to install when it is missing
        return analog.prepare(model, config)  # the arrays' optimizer, with the same per-layer rates
    scale_tile_rates(optimizer, model, float(config.tile_lr_power), config.layer_lr_scales())
    return model, optimizer


def _random_in_eval(model: nn.Module) -> bool:
    """Whether evaluation passes differ: a random scheme with more than one tile, in a digital or
    an analog layer, or analog arrays (their reads are noisy); a net with no tiled layer at all
    counts as random (unknown layers)."""
    modules = list(model.modules())
    tiled = [m for m in modules if isinstance(m, TiledConvBase)]
    return (not tiled or any(m.scheme == "random" and m.tiles > 1 for m in tiled)
            or any(not isinstance(m, TiledConv2d) for m in tiled)  # analog replicas
            or any(type(m).__module__.startswith("aihwkit.") for m in modules))


@torch.no_grad()
def single_pass_error(model: nn.Module, loader: BatchLoader, desc: str | None = None) -> float:
    """Error (fraction) of one forward pass per image in evaluation mode (one random draw);
    ``desc`` labels a progress bar (:mod:`rapa.progress`)."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=loader.device)
    for x, y in loader if desc is None else track(loader, desc):
        wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return wrong.item() / loader.num_samples


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, votes: int = 9, device: torch.device | str | None = None,
             batch_size: int = 500, threshold: float = 0.9) -> dict[str, Any]:
    """Test errors (fractions) of ``model`` on ``data``: ``single`` (one pass per image),
    ``vote`` (majority of ``votes`` passes), ``adaptive`` (:func:`rapa.voting.adaptive_vote`)
    and ``adaptive_passes`` (mean passes per image).

    A net whose evaluation is deterministic (no random tiling) gets one pass; its voting
    errors equal the single one.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    loader = make_loader(data, batch_size, device=device)
    single = single_pass_error(model, loader, "test error, one pass")
    out = {"single": single, "vote": single, "votes": votes, "adaptive": single, "adaptive_passes": 1.0}
    if votes > 1 and _random_in_eval(model):
        vote_wrong = adaptive_wrong = passes = 0
        for x, y in track(loader, f"test error, {votes} votes"):
            vote_wrong += int((majority_vote(model, x, votes) != y).sum())
            labels, n_passes = adaptive_vote(model, x, max_votes=votes, threshold=threshold)
            adaptive_wrong += int((labels != y).sum())
            passes += int(n_passes.sum())
        n = loader.num_samples
        out.update(vote=vote_wrong / n, adaptive=adaptive_wrong / n, adaptive_passes=passes / n)
    return out


def load_data(config: TrainConfig) -> tuple[ImageData, ImageData, DatasetInfo]:
    """The train and test splits of ``config.dataset`` (limited as configured) and its info."""
    train_data = load_dataset(config.dataset, "train", config.data_dir, config.download, config.limit_train)
    test_data = load_dataset(config.dataset, "test", config.data_dir, config.download, config.limit_test)
    return train_data, test_data, dataset_info(config.dataset)


# --------------------------------------------------------------------------- training


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          overwrite: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``config`` into the run directory ``out_dir``; returns the summary (summary.json).

    Args:
        config: the run; validated (RapaError) before anything is written.
        out_dir: run directory (created).
        resume: continue from the run's checkpoint; only the fields in
            :data:`rapa.rundir.RESUMABLE_FIELDS` (e.g. ``epochs``, ``device``) and ``lr``
            (:data:`rapa.rundir.RESUME_OVERRIDES`) may differ from the saved config.
        progress: a progress bar per epoch (on a terminal) and a line per epoch.
        overwrite: replace a run already in ``out_dir`` instead of refusing.
        on_epoch: called with each epoch's metrics row.

    Raises:
        RapaError: invalid config, missing data, a non-finite loss (the run stops; the last
            good checkpoint stays).
    """
    t_start = time.perf_counter()
    config = config.resolved()
    device = torch.device(config.device)
    out = Path(out_dir)
    train_data, test_data, info = load_data(config)
    resume_from = rundir.prepare(out, config, resume, overwrite)
    ckpt = None if resume_from is None else load_checkpoint(resume_from)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model, optimizer = make_model_and_optimizer(config, info, device, train_data)
    data_gen = torch.Generator().manual_seed(config.seed + _DATA_SEED_OFFSET)
    loader = make_loader(train_data, config.batch_size, shuffle=True, augment=config.augment,
                         mirror=config.mirror, device=device, generator=data_gen)
    test_loader = make_loader(test_data, config.eval_batch_size, device=device)
    history: list[dict[str, Any]] = []
    start_epoch, train_seconds, seen, wall_before = 0, 0.0, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        data_gen.set_state(ckpt["rng_data"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        train_seconds, seen, wall_before = ckpt["train_seconds"], ckpt["images_seen"], ckpt["wall_seconds"]
    rundir.write_config(out, config, {"torch_version": torch.__version__, "rapa_version": __version__})
    rundir.write_metrics(out, history)
    arrays = _ArraysLog(out, model, optimizer, start_epoch) if config.analog is not None else None
    say = _printer(progress)
    if ckpt is not None:
        say(f"resuming {out} after epoch {start_epoch}")

    model.train()
    for epoch in range(start_epoch, config.epochs):
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # scale_tile_rates' per-layer factor
        t0 = time.perf_counter()
        loss_sum, wrong = _train_epoch(model, optimizer, loader, epoch, progress, out)
        train_seconds += time.perf_counter() - t0
        seen += loader.num_samples
        last = epoch + 1 == config.epochs
        test_err = single_pass_error(model, test_loader) if last or (epoch + 1) % config.eval_every == 0 else math.nan
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / loader.num_samples,
               "train_error": wrong / loader.num_samples, "test_error": test_err,
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        save_checkpoint({  # first the checkpoint, then its row: a resume never sees a row without one
            "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "rng_data": data_gen.get_state(), "history": history, "train_seconds": train_seconds,
            "images_seen": seen, "wall_seconds": wall_before + time.perf_counter() - t_start,
        }, out / rundir.CHECKPOINT_FILE)
        rundir.append_metrics(out, row)
        if arrays is not None:
            arrays.write(epoch + 1)
        say(_epoch_line(row, config.epochs))
        if on_epoch is not None:
            on_epoch(row)

    torch.manual_seed(config.seed)  # the tile draws `rapa eval DIR` makes too: both report the same errors
    with shown(progress):
        results = evaluate(model, test_data, config.votes, device, config.eval_batch_size, config.adaptive_threshold)
    summary = _summary(config, model, history, results, train_seconds, seen,
                       wall_before + time.perf_counter() - t_start)
    counts = torch.bincount(test_data.labels, minlength=info.num_classes)
    summary.update(train_images=len(train_data), test_images=len(test_data),  # trivial: the most frequent class
                   trivial_test_error=1.0 - counts.max().item() / max(len(test_data), 1))
    rundir.write_summary(out, summary)
    return summary


class _ArraysLog:
    """``arrays.json`` of an analog run: an :class:`rapa.analog.diagnostics.UpdateMonitor` on
    the optimizer and, after each epoch, one :func:`~rapa.analog.diagnostics.epoch_record`
    (a resumed run keeps the records up to its checkpoint's epoch)."""

    def __init__(self, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        from rapa.analog.diagnostics import UpdateMonitor

        self.path, self.model = out / rundir.ARRAYS_FILE, model
        self.monitor = UpdateMonitor(optimizer, model)
        old = (rundir.read_json(self.path) or {}).get("epochs", [])
        self.records = [r for r in old if isinstance(r, dict) and r.get("epoch", 0) <= start_epoch]

    def write(self, epoch: int) -> None:
        from rapa.analog.diagnostics import epoch_record

        self.records.append(epoch_record(self.model, self.monitor, epoch))
        rundir.atomic_write_text(self.path, json.dumps({"epochs": self.records}, indent=1) + "\n")


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: BatchLoader, epoch: int,
                 progress: bool, run_dir: Path | None = None) -> tuple[float, int]:
    """One epoch of SGD; returns (summed loss, misclassified count) over the augmented batches."""
    device = loader.device
    check_every = 1 if device.type == "cpu" else 50  # a finiteness check syncs with the GPU
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}", leave=False, unit="batch",
               disable=None if progress else True, file=sys.stderr)
    for i, (x, y) in enumerate(bar):
        logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * y.shape[0]
        wrong += (logits.detach().argmax(1) != y).sum()
        n += y.shape[0]
        if (i + 1) % check_every == 0 or i + 1 == len(loader):
            if not math.isfinite(loss_sum.item()):
                bar.close()
                kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint was written"
                raise RapaError(f"the loss became {loss_sum.item()} in epoch {epoch + 1} (batch {i + 1}); "
                                f"training stopped, {kept}. Lower the learning rate: `rapa train --resume "
                                f"{run_dir or 'DIR'} --lr X` goes on with it from there, or start again "
                                f"with the same options and a lower --lr plus --overwrite")
        if not bar.disable and (i + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}", err=f"{100 * wrong.item() / n:.1f}%")
    return loss_sum.item(), int(wrong.item())


def _printer(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    return lambda msg: tqdm.write(msg, file=sys.stdout)


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    test = "  -  " if math.isnan(row["test_error"]) else f"{100 * row['test_error']:5.2f}%"
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.4f}"
            f"  train err {100 * row['train_error']:5.2f}%  test err {test}  ({row['seconds']:.1f} s)")


def _summary(config: TrainConfig, model: nn.Module, history: list[dict[str, Any]], results: dict[str, float],
             train_seconds: float, seen: int, wall: float) -> dict[str, Any]:
    info = dataset_info(config.dataset)
    nps = output_pixels(info.size)
    best = best_moving_average([r["test_error"] for r in history], [r["train_error"] for r in history])
    count = getattr(model, "conv_weight_count", None)
    return {
        "dataset": config.dataset, "scheme": config.scheme, "tiles": list(config.tiles) if config.tiles else None,
        "epochs": len(history), **{f"best5_{k}": v for k, v in best.items()},
        "final_train_error": history[-1]["train_error"] if history else None,
        "final_test_error": results["single"], "vote_test_error": results["vote"], "votes": config.votes,
        "adaptive_test_error": results["adaptive"], "adaptive_mean_passes": results["adaptive_passes"],
        "conv_weights": count() if callable(count) else None, "output_pixels": list(nps),
        "analog_speedup": analog_speedup(nps, config.tiles if config.scheme != "none" else None),
        "wall_seconds": round(wall, 3), "train_seconds": round(train_seconds, 3),
        "images_per_s": seen / train_seconds if train_seconds > 0 else None,
        "tiled_conv": _implementation(config),
    }


def _implementation(config: TrainConfig) -> str | None:
    """Which implementation ran the tiled layers (provenance: the two round differently)."""
    if not config.tiles or config.scheme == "none" or config.analog is not None:
        return None
    if torch.device(config.device).type != "cpu":
        return f"PyTorch path on {config.device}"
    return describe_native()


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, dict | None]:
    """The trained model (evaluation mode, on ``device``), config and summary (None while
    the run is unfinished) of a run directory. RapaError if it is not a readable run."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    dev = resolve_device(str(device))
    config.device = str(dev)
    ckpt = load_checkpoint(run_dir / rundir.CHECKPOINT_FILE, map_location=dev)
    model, _ = make_model_and_optimizer(config, dataset_info(config.dataset), dev)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as exc:
        raise RapaError(f"checkpoint in {run_dir} does not match its config: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, config, rundir.read_summary(run_dir, strict=True)
