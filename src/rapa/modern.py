"""The demonstration beyond the paper (issue 17): RAPA on a residual and a depthwise-separable net.

For each net of :mod:`rapa.nets` (``resnet``, ``separable``) and seed it trains the untiled
net (plain ``nn.Conv2d``) and the same net converted with
``rapa.convert(net, tiles="balanced", scheme="random")``, on Fashion-MNIST, with the same
recipe: SGD with momentum, cosine learning rate, weight decay, minibatch 64, moderate
augmentation (mirroring, brightness). Each run records its test error of one pass and of a
9-vote majority (:func:`rapa.voting.majority_vote`) with 95% Wilson intervals over the test
images (fractions: ``single_error``, ``vote_error``, ``*_error_ci``), the run-time model's
speed-up (:func:`rapa.summary.conversion_summary`) and its wall time; :func:`aggregate`
writes ``summary.md`` / ``summary.json`` with the mean over seeds and a 95% t-interval.

    rapa modern --out results/modern --epochs 2 --seeds 0 1 2 --jobs 2

A run whose ``run.json`` exists is skipped, so an interrupted command goes on where it
stopped. ``scripts/modern-fmnist.sh`` is the demonstration's command.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rapa.convert import convert
from rapa.data import dataset_info, load_dataset, make_loader
from rapa.errors import RapaError
from rapa.nets import build_net
from rapa.summary import conversion_summary
from rapa.voting import majority_vote

NET_NAMES: tuple[str, ...] = ("resnet", "separable")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t quantile 0.975 by degrees of freedom (more than 9: 1.96 is used)."""


@dataclass
class ModernRun:
    """One training run of the demonstration."""

    net: str
    """``resnet`` or ``separable`` (:data:`rapa.nets.NETS`)."""
    tiled: bool
    """Converted with ``tiles='balanced'``, ``scheme='random'`` (else untiled ``nn.Conv2d``)."""
    seed: int
    """Seed of the initialisation, data order, augmentation and tile draws."""
    epochs: int = 2
    """Passes over the training images."""
    batch_size: int = 64
    """Minibatch size."""
    lr: float = 0.05
    """Peak learning rate, annealed to 0 by a cosine over all steps."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Torch's SGD weight decay."""
    augment: str = "moderate"
    """Augmentation kind of :func:`rapa.data.make_loader`."""
    dataset: str = "fashion-mnist"
    """Dataset name (:data:`rapa.data.DATASETS`)."""
    limit_train: int | None = None
    """Use only this many training images (None: all)."""
    limit_test: int | None = None
    """Use only this many test images (None: all)."""
    votes: int = 9
    """Passes of the majority vote."""

    @property
    def name(self) -> str:
        """The run's folder name: ``NET-tiled|untiled-sSEED``."""
        return f"{self.net}-{'tiled' if self.tiled else 'untiled'}-s{self.seed}"


def wilson(errors: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an error rate ``errors / n``."""
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_one(run: ModernRun, out_dir: str | Path, threads: int = 1) -> dict[str, Any]:
    """Train and evaluate ``run``; write and return ``out_dir/run.name/run.json``."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    info = dataset_info(run.dataset)
    train_data = load_dataset(run.dataset, "train", limit=run.limit_train)
    test_data = load_dataset(run.dataset, "test", limit=run.limit_test)
    size = (info.in_channels, *train_data.images.shape[-2:])
    torch.manual_seed(run.seed)
    model = build_net(run.net, num_classes=info.num_classes, in_channels=info.in_channels)
    if run.tiled:
        convert(model, "balanced", "random", input_size=size)
    summary = conversion_summary(model, size)
    gen = torch.Generator().manual_seed(run.seed)
    loader = make_loader(train_data, run.batch_size, shuffle=True, augment=run.augment, drop_last=True,
                         generator=gen)
    steps = run.epochs * len(loader)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    history = []
    for epoch in range(run.epochs):
        model.train()
        t0, loss_sum, wrong, n = time.perf_counter(), 0.0, 0, 0
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * y.shape[0]
            wrong += int((logits.argmax(1) != y).sum())
            n += y.shape[0]
        if not math.isfinite(loss_sum):
            raise RapaError(f"{run.name}: the loss became {loss_sum} in epoch {epoch + 1}; lower --lr")
        history.append({"epoch": epoch + 1, "loss": loss_sum / n, "train_error": wrong / n,
                        "seconds": time.perf_counter() - t0})
    t_eval = time.perf_counter()
    model.eval()
    wrong_single = wrong_vote = 0
    with torch.no_grad():  # one pass, and the majority of `votes` passes (the same for an untiled net)
        for x, y in make_loader(test_data, 500):
            wrong_single += int((model(x).argmax(1) != y).sum())
            if run.tiled and run.votes > 1:
                wrong_vote += int((majority_vote(model, x, run.votes) != y).sum())
    n_test = len(test_data.labels)
    if not (run.tiled and run.votes > 1):
        wrong_vote = wrong_single
    result = {
        "run": dataclasses.asdict(run), "name": run.name, "history": history, "test_images": n_test,
        "single_error": wrong_single / n_test, "vote_error": wrong_vote / n_test,
        "single_error_ci": wilson(wrong_single, n_test), "vote_error_ci": wilson(wrong_vote, n_test),
        "tiles": [layer.nt for layer in summary.layers],
        "speedup_pipelined": summary.report.speedup_pipelined,
        "speedup_sequential": summary.report.speedup_sequential,
        "eval_seconds": time.perf_counter() - t_eval, "wall_seconds": time.perf_counter() - start,
        "threads": threads, "torch_version": torch.__version__,
    }
    folder = Path(out_dir) / run.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


_ERROR_KEYS = {"single": "single_error", "vote": "vote_error", "single_ci": "single_error_ci",
               "vote_ci": "vote_error_ci"}
"""run.json's error keys (fractions) by their names before the unit was in the key."""


def _read_run(path: Path) -> dict:
    """A run.json, one written before the errors were named ``*_error`` too."""
    run = json.loads(path.read_text())
    for old, new in _ERROR_KEYS.items():
        if new not in run and old in run:
            run[new] = run.pop(old)
    return run


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval over the seeds (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def aggregate(out_dir: str | Path, command: str = "", wall_seconds: float | None = None) -> str:
    """Write ``summary.md`` and ``summary.json`` of the runs in ``out_dir``; return the table."""
    out = Path(out_dir)
    runs = [_read_run(p) for p in sorted(out.glob("*/run.json"))]
    if not runs:
        raise RapaError(f"{out}: no run.json found; run the demonstration first")
    rows, table = [], []
    for net in NET_NAMES:
        for tiled in (False, True):
            rs = [r for r in runs if r["run"]["net"] == net and r["run"]["tiled"] == tiled]
            if not rs:
                continue
            single, vote = _mean_ci([r["single_error"] for r in rs]), _mean_ci([r["vote_error"] for r in rs])
            row = {"net": net, "tiled": tiled, "seeds": [r["run"]["seed"] for r in rs], "single_error": single,
                   "vote_error": vote, "tiles": rs[0]["tiles"], "speedup_pipelined": rs[0]["speedup_pipelined"],
                   "speedup_sequential": rs[0]["speedup_sequential"],
                   "per_seed": {str(r["run"]["seed"]): {k: r[k] for k in _ERROR_KEYS.values()} for r in rs},
                   "run_seconds": statistics.fmean(r["wall_seconds"] for r in rs)}
            rows.append(row)
            table.append(f"| {net} | {'balanced random' if tiled else 'untiled'} | {len(rs)} | "
                         f"{100 * single[0]:.2f} ± {100 * single[1]:.2f} | {100 * vote[0]:.2f} ± {100 * vote[1]:.2f} | "
                         f"{','.join(map(str, rs[0]['tiles']))} | {rs[0]['speedup_pipelined']:.1f}x / "
                         f"{rs[0]['speedup_sequential']:.1f}x | {row['run_seconds'] / 60:.1f} |")
    first = runs[0]["run"]
    head = [f"Fashion-MNIST ({runs[0]['test_images']} test images), {first['epochs']} epochs, minibatch "
            f"{first['batch_size']}, SGD lr {first['lr']} cosine, momentum {first['momentum']}, weight decay "
            f"{first['weight_decay']}, augmentation {first['augment']}"
            + (f", first {first['limit_train']} training images" if first["limit_train"] else ""),
            "test error in % (mean over seeds ± 95% t-interval half-width); per-seed 95% Wilson "
            "intervals over the test images in summary.json", "",
            "| net | conv layers | seeds | single pass | 9-vote | tiles per conv layer | speed-up pipelined / "
            "sequential | minutes per run |", "|---|---|---|---|---|---|---|---|"]
    text = "\n".join(head + table)
    if command:
        text += f"\n\ncommand: `{command}`"
    if wall_seconds is not None:
        text += f"\nwall time: {wall_seconds / 60:.1f} minutes"
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"command": command, "wall_seconds": wall_seconds,
                                                  "rows": rows}, indent=2) + "\n")
    return text


def run_all(out_dir: str | Path, nets: Sequence[str] = NET_NAMES, seeds: Sequence[int] = (0, 1, 2), epochs: int = 2,
            lr: float = 0.05, limit_train: int | None = None, limit_test: int | None = None, jobs: int = 2,
            command: str = "", say: Callable[[str], None] = print) -> str:
    """Train the runs (every net and seed, untiled and tiled) that ``out_dir`` does not hold yet,
    ``jobs`` at a time (one thread each; ``say`` gets a line per finished run), then
    :func:`aggregate` them (``command`` is recorded); returns the summary table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [ModernRun(net, tiled, seed, epochs=epochs, lr=lr, limit_train=limit_train, limit_test=limit_test)
            for net in nets for seed in seeds for tiled in (False, True)]
    todo = [r for r in runs if not (out / r.name / "run.json").exists()]
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run_one, todo, [out] * len(todo)):
            say(f"{result['name']}: single {100 * result['single_error']:.2f}%, 9-vote "
                f"{100 * result['vote_error']:.2f}%, {result['wall_seconds'] / 60:.1f} min")
    return aggregate(out, command, time.perf_counter() - start if todo else None)


if __name__ == "__main__":  # the former entry point; the options are `rapa modern`'s (rapa.cli.modern)
    warnings.warn("`python -m rapa.modern` is deprecated: use `rapa modern` (same options)", DeprecationWarning)
    os.execv(sys.executable, [sys.executable, "-m", "rapa.cli", "modern", *sys.argv[1:]])
