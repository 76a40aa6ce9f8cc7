"""Adversarial robustness (paper §3.6, Fig. 7; SPEC §4): FGSM at a given signal-to-noise ratio.

FGSM (Goodfellow et al. 2014) adds ``delta = eps * sign(grad_x loss)``. Following Cisse
et al. (2017) its strength is given as ``SNR = 20 log10(||x||_2 / ||delta||_2)`` dB, so
``eps = ||x||_2 / (10^(SNR/20) * sqrt(d))`` per image (``d`` = C*H*W); the SNR is exact
when no gradient coordinate is 0. Without ``pixel`` everything is computed in the model's
input space, i.e. on the NORMALISED images (``(pixel/255 - mean) / std``); with
``pixel=(mean, std)`` (the dataset's normalisation) the SNR is that of the PIXEL-space
images ``x * std + mean`` and their perturbation (:func:`pixel_epsilon`), as a person
sees them: the sign step is scaled by ``1/std`` per channel in the model's space. The
normalised SNR differs from the pixel one by about 2 dB on Fashion-MNIST. No clipping to
the pixel range. About 33 dB is the threshold of human perception.

Accuracy is measured over the test images the model classified correctly in one clean
evaluation-mode pass, and each adversarial image is judged by a fresh evaluation pass.
A randomly tiled net draws a new assignment on every pass, so three attacks are run:

* ``fgsm``: the paper's attack, the gradient of one random assignment;
* ``fgsm_eot``: Expectation over Transformation (Athalye et al. 2018), the gradient
  averaged over ``eot`` assignments (default 8);
* ``pgd_eot``: projected gradient descent with EOT gradients, a stronger check: random
  start in the L_inf ball of the same ``eps``, ``steps`` signed steps of
  ``step_size * eps`` (default ``2.5 / steps``), projected back onto the ball.

For a deterministic net (no ``random`` tiling) every draw is the same and ``eot`` is 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rapa import rundir
from rapa.analysis.common import frozen_eval, iter_batches, model_device, stochastic_in_eval
from rapa.rundir import file_keys, read_keys

__all__ = ["ATTACKS", "AT_FILE_KEYS", "CURVE_FILE_KEYS", "DEFAULT_SNRS", "HUMAN_THRESHOLD_DB", "INPUT_SPACE",
           "SNR_RANGE", "accuracy_at", "attack_record", "attack_runs", "check_snrs", "fgsm", "gap_reduction",
           "input_gradient", "measured_snr", "pgd", "pixel_epsilon", "plot_robustness", "read_attack",
           "robustness_curve", "save_attack", "snr_epsilon", "threshold_accuracies"]
Pixel = tuple[Sequence[float], Sequence[float]]
"""A dataset's normalisation ``(mean, std)`` per channel: model input = (pixel/255 - mean) / std."""

ATTACKS: tuple[str, ...] = ("fgsm", "fgsm_eot", "pgd_eot")
DEFAULT_SNRS: tuple[float, ...] = (10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)
SNR_RANGE: tuple[float, float] = (-20.0, 100.0)
"""SNRs (dB) that :func:`check_snrs` accepts."""
HUMAN_THRESHOLD_DB = 33.0
"""About the threshold of human perception (Cisse et al. 2017): where the gap reduction is read."""
CURVE_FILE_KEYS = {"accuracy": "accuracy_percent", "clean_accuracy": "clean_accuracy_percent"}
"""How ``attack.json`` names the accuracies (percent) of a :func:`robustness_curve`
(:func:`rapa.analysis.common.file_keys`; files written before read the same)."""
AT_FILE_KEYS = {"model": "model_accuracy_percent", "baseline": "baseline_accuracy_percent"}
"""How ``attack.json``'s ``at_threshold`` rows name the accuracies at 33 dB (percent); the gap
reduction there is ``gap_reduction_fraction``."""


def check_snrs(snrs: Sequence[float]) -> tuple[float, ...]:
    """The SNRs as floats; ValueError naming the value if one is outside :data:`SNR_RANGE`."""
    out = tuple(float(s) for s in snrs)
    if not out:
        raise ValueError("snrs is empty: give at least one SNR in dB")
    lo, hi = SNR_RANGE
    for s in out:
        if not lo <= s <= hi:  # also rejects NaN
            raise ValueError(f"snr={s:g} dB is outside the range [{lo:g}, {hi:g}] dB")
    return out


def snr_epsilon(x: Tensor, snr_db: float) -> Tensor:
    """Per-image FGSM strength ``(N,)``: ``||x||_2 / (10^(snr/20) * sqrt(d))``.

    ``snr_db = inf`` (or a huge value) gives 0; NaN is rejected.
    """
    if isinstance(snr_db, bool) or not isinstance(snr_db, (int, float)) or math.isnan(snr_db):
        raise ValueError(f"snr_db={snr_db!r} must be a number (dB)")
    d = x[0].numel()
    factor = torch.pow(torch.tensor(10.0, dtype=torch.float64), torch.tensor(-float(snr_db) / 20.0,
                                                                             dtype=torch.float64))
    norm = x.detach().flatten(1).to(torch.float64).norm(dim=1)  # (N,)
    return (norm * factor / math.sqrt(d)).to(x.dtype)  # (N,)


def pixel_epsilon(x: Tensor, snr_db: float, pixel: Pixel | None = None) -> Tensor:
    """Per-image (and per-channel) step ``(N, C, 1, 1)`` in the model's input space whose sign
    perturbation has SNR ``snr_db`` on the pixel-space images ``x * std + mean``
    (``pixel = (mean, std)``); without ``pixel``, :func:`snr_epsilon` (normalised space)."""
    if pixel is None:
        return snr_epsilon(x, snr_db).view(-1, *([1] * (x.dim() - 1)))
    mean, std = (torch.tensor([float(v) for v in t], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                 for t in pixel)
    eps = snr_epsilon(x.detach() * std + mean, snr_db)  # (N,) in pixel units
    return eps.view(-1, 1, 1, 1) / std  # (N, C, 1, 1) in the model's units


def measured_snr(x: Tensor, x_adv: Tensor) -> Tensor:
    """``20 log10(||x|| / ||x_adv - x||)`` per image ``(N,)`` in dB (inf where nothing changed)."""
    num = x.detach().flatten(1).to(torch.float64).norm(dim=1)
    den = (x_adv.detach() - x.detach()).flatten(1).to(torch.float64).norm(dim=1)
    return 20.0 * torch.log10(num / den)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, eot: int = 1) -> Tensor:
    """Gradient of the summed cross-entropy with respect to ``x`` ``(N, C, H, W)``, averaged
    over ``eot`` evaluation-mode passes (each a new tile assignment of a random net; a
    deterministic net gets one pass). Parameter gradients are neither computed nor stored."""
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot={eot!r} must be a positive integer")
    with frozen_eval(model), torch.enable_grad():
        draws = eot if stochastic_in_eval(model) else 1
        x = x.detach().requires_grad_(True)
        grad = torch.zeros_like(x)
        for _ in range(draws):  # loop over random draws, not samples
            loss = F.cross_entropy(model(x), y, reduction="sum")
            grad += torch.autograd.grad(loss, x)[0]  # (N, C, H, W)
    return grad / draws


def _perturb(x: Tensor, direction: Tensor, eps: Tensor) -> Tensor:
    if eps.dim() == 1:
        eps = eps.view(-1, *([1] * (x.dim() - 1)))
    return x.detach() + eps * direction  # (N, C, H, W)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, snr_db: float, eot: int = 1, pixel: Pixel | None = None) -> Tensor:
    """FGSM adversarial images ``x + eps * sign(grad)`` at ``snr_db`` (see :func:`snr_epsilon`;
    :func:`pixel_epsilon` with ``pixel``); ``eot > 1`` averages the gradient over that many
    random assignments (EOT)."""
    eps = pixel_epsilon(x, snr_db, pixel)  # (N, 1 or C, 1, 1)
    return _perturb(x, input_gradient(model, x, y, eot).sign(), eps)


def pgd(model: nn.Module, x: Tensor, y: Tensor, snr_db: float, steps: int = 10, eot: int = 8,
        step_size: float | None = None, generator: torch.Generator | None = None,
        pixel: Pixel | None = None) -> Tensor:
    """L_inf PGD with EOT gradients in the ball of FGSM's ``eps`` at ``snr_db``.

    Random start uniform in the ball (from ``generator``), then ``steps`` steps of
    ``step_size * eps`` (default ``2.5 / steps``) along the sign of the EOT gradient,
    projected back onto the ball. The result's SNR is at least ``snr_db``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    alpha = 2.5 / steps if step_size is None else float(step_size)
    if not alpha > 0:
        raise ValueError(f"step_size={step_size!r} must be positive")
    eps = pixel_epsilon(x, snr_db, pixel)  # (N, 1 or C, 1, 1)
    x = x.detach()
    if generator is None:
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device)
    else:
        u = torch.rand(x.shape, dtype=x.dtype, device=generator.device, generator=generator).to(x.device)
    delta = (2 * u - 1) * eps  # (N, C, H, W) uniform in the ball
    for _ in range(steps):  # optimisation steps, not samples
        g = input_gradient(model, x + delta, y, eot)
        delta = torch.maximum(torch.minimum(delta + alpha * eps * g.sign(), eps), -eps)
    return x + delta


@torch.no_grad()
def _hits(model: nn.Module, x: Tensor, y: Tensor) -> int:
    return int((model(x).argmax(1) == y).sum())


def robustness_curve(model: nn.Module, data: Any, snrs: Sequence[float] = DEFAULT_SNRS,
                     attacks: Sequence[str] = ATTACKS, eot: int = 8, pgd_steps: int = 10,
                     pgd_step_size: float | None = None, batch_size: int = 100, limit: int | None = None,
                     generator: torch.Generator | None = None, pixel: Pixel | None = None) -> dict[str, Any]:
    """Accuracy (percent) against SNR for every attack, over the correctly classified images.

    ``pixel=(mean, std)``: the SNR is measured on pixel-space images (:func:`pixel_epsilon`).

    ``data``: test images with labels (see :func:`rapa.analysis.common.iter_batches`),
    the first ``limit`` are used. The FGSM gradient does not depend on the SNR, so it is
    computed once per batch. Returns ``{"snr_db", "accuracy": {attack: [...]}, "images",
    "correct", "clean_accuracy", "stochastic", "eot", "pgd_steps", "pgd_step_size"}``.
    """
    snrs = check_snrs(snrs)
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"attack={a!r} is unknown; choose among {', '.join(ATTACKS)}")
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot={eot!r} must be a positive integer")
    stochastic = stochastic_in_eval(model)
    k = eot if stochastic else 1
    hits = {a: [0] * len(snrs) for a in attacks}
    images = correct = 0
    with frozen_eval(model):
        for x, y in iter_batches(data, batch_size, model_device(model), limit, desc="attacking"):
            if y is None:
                raise ValueError("data without labels: the attack needs (x, y)")
            with torch.no_grad():
                ok = model(x).argmax(1) == y  # (N,) one clean pass
            images += y.shape[0]
            xs, ys = x[ok], y[ok]
            correct += ys.shape[0]
            if ys.numel() == 0:
                continue
            signs: dict[int, Tensor] = {}  # FGSM direction per number of draws
            for a in attacks:
                for i, snr in enumerate(snrs):
                    if a == "pgd_eot":
                        adv = pgd(model, xs, ys, snr, pgd_steps, k, pgd_step_size, generator, pixel)
                    else:
                        draws = 1 if a == "fgsm" else k
                        if draws not in signs:
                            signs[draws] = input_gradient(model, xs, ys, draws).sign()
                        adv = _perturb(xs, signs[draws], pixel_epsilon(xs, snr, pixel))
                    hits[a][i] += _hits(model, adv, ys)  # judged by a fresh pass
    acc = {a: [100.0 * h / correct if correct else float("nan") for h in hits[a]] for a in attacks}
    return {"snr_db": list(snrs), "accuracy": acc, "images": images, "correct": correct,
            "clean_accuracy": 100.0 * correct / images if images else float("nan"),
            "stochastic": stochastic, "eot": k, "pgd_steps": pgd_steps,
            "snr_space": "normalised" if pixel is None else "pixel",
            "pgd_step_size": 2.5 / pgd_steps if pgd_step_size is None else pgd_step_size}


def gap_reduction(acc_tiled: float, acc_base: float) -> float:
    """Fraction of the gap to perfect robustness closed: ``(acc_tiled - acc_base) / (100 - acc_base)``.

    Accuracies in percent; NaN when the baseline is already at 100%.
    """
    for name, v in (("acc_tiled", acc_tiled), ("acc_base", acc_base)):
        if not (0.0 <= float(v) <= 100.0 or math.isnan(float(v))):
            raise ValueError(f"{name}={v!r} must be a percentage in [0, 100]")
    if float(acc_base) >= 100.0:
        return float("nan")
    return (float(acc_tiled) - float(acc_base)) / (100.0 - float(acc_base))


def accuracy_at(snrs: Sequence[float], accuracy: Sequence[float], snr: float = HUMAN_THRESHOLD_DB) -> float:
    """Accuracy at ``snr`` dB, interpolated linearly between the measured SNRs (NaN outside)."""
    s = np.asarray(snrs, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    order = np.argsort(s)
    s, a = s[order], a[order]
    if s.size == 0 or not s[0] <= snr <= s[-1]:
        return float("nan")
    return float(np.interp(snr, s, a))


INPUT_SPACE = "normalised images ((pixel/255 - mean) / std), no clipping"
"""What the attacks perturb (``attack.json``'s ``input_space``)."""
_OMIT = object()


def attack_runs(models: dict[str, nn.Module], data: Any, snrs: Sequence[float] = DEFAULT_SNRS,
                attacks: Sequence[str] = ATTACKS, eot: int = 8, pgd_steps: int = 10, batch_size: int = 100,
                seed: int = 0, pixel: Pixel | None = None) -> dict[str, dict[str, Any]]:
    """:func:`robustness_curve` of every net of ``models`` (by key: ``model``, ``baseline``)
    on the same images, each with the tile draws and PGD starts seeded by ``seed``."""
    curves = {}
    for key, model in models.items():
        torch.manual_seed(seed)
        curves[key] = robustness_curve(model, data, snrs, attacks, eot=eot, pgd_steps=pgd_steps,
                                       batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                                       pixel=pixel)
    return curves


def threshold_accuracies(curves: dict[str, dict[str, Any]], attacks: Sequence[str],
                         snr: float = HUMAN_THRESHOLD_DB) -> dict[str, dict[str, float]]:
    """Per attack, every net's accuracy (percent) at ``snr`` dB (:func:`accuracy_at`) and,
    with a ``baseline`` curve, the ``gap_reduction_fraction`` of the ``model`` one."""
    at = {}
    for attack in attacks:
        row = {key: accuracy_at(c["snr_db"], c["accuracy"][attack], snr) for key, c in curves.items()}
        if "baseline" in curves:
            row["gap_reduction_fraction"] = gap_reduction(row["model"], row["baseline"])  # the others: percent
        at[attack] = row
    return at


def attack_record(curves: dict[str, dict[str, Any]], at: dict[str, dict[str, float]], run_dir: str | Path,
                  dataset: str, test_images: int, baseline_dir: str | Path | None = None,
                  labels: dict[str, str] | None = None, limit: Any = _OMIT) -> dict[str, Any]:
    """The record of ``attack.json`` (accuracies with the unit in the key): the curves and
    the :func:`threshold_accuracies` ``at`` of the nets of ``run_dir`` (and ``baseline_dir``).
    ``labels`` (``rapa attack``): the nets' names, with the spaces the SNR was measured in;
    ``limit`` (the sweeps' cache): the test images asked for."""
    record: dict[str, Any] = {"run_dir": str(run_dir),
                              "baseline_dir": None if baseline_dir is None else str(baseline_dir),
                              "dataset": dataset}
    if limit is not _OMIT:
        record["limit"] = limit
    record.update(test_images=test_images, snr_db=list(curves["model"]["snr_db"]))
    if labels is not None:
        record.update(input_space=INPUT_SPACE, snr_space=curves["model"]["snr_space"], labels=labels)
    record.update(curves={k: file_keys(c, CURVE_FILE_KEYS) for k, c in curves.items()}, at_db=HUMAN_THRESHOLD_DB,
                  at_threshold={a: file_keys(row, AT_FILE_KEYS) for a, row in at.items()})
    return record


def save_attack(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (:func:`attack_record`) as ``folder``'s ``attack.json``; returns its path."""
    return rundir.write_result(folder, "robustness", record)


def read_attack(run_dir: str | Path, fresh: bool = False) -> dict[str, Any] | None:
    """The ``attack.json`` of ``run_dir`` with rapa's own keys in its curves and rows (None:
    none; ``fresh``: none newer than the run's checkpoint)."""
    record = rundir.read_result(run_dir, "robustness", fresh=fresh)
    if record is None:
        return None
    for key, names in (("curves", CURVE_FILE_KEYS), ("at_threshold", AT_FILE_KEYS)):
        if isinstance(record.get(key), dict):
            record[key] = {k: read_keys(v, names) if isinstance(v, dict) else v for k, v in record[key].items()}
    return record


ATTACK_LABELS = {"fgsm": "FGSM", "fgsm_eot": "EOT-FGSM", "pgd_eot": "EOT-PGD"}
"""How the attacks are named in plots and tables."""


def plot_title(curves: dict[str, dict[str, Any]]) -> str:
    """``"Robustness to FGSM, EOT-FGSM, SNR 10-50 dB"``: the attacks and the SNR range of ``curves``."""
    attacks = list(dict.fromkeys(a for res in curves.values() for a in res["accuracy"]))
    snrs = [s for res in curves.values() for s in res["snr_db"]]
    names = ", ".join(ATTACK_LABELS.get(a, a) for a in attacks)
    span = f"{min(snrs):g}-{max(snrs):g} dB" if len(set(snrs)) > 1 else f"{snrs[0]:g} dB" if snrs else "no SNR"
    return f"Robustness to {names}, SNR {span}"


def plot_robustness(curves: dict[str, dict[str, Any]], path: str | Path,
                    threshold_db: float = HUMAN_THRESHOLD_DB) -> None:
    """Accuracy against SNR (paper Fig. 7): one colour per model (the keys of ``curves``,
    each a :func:`robustness_curve` result), one line style per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"fgsm": "-", "fgsm_eot": "--", "pgd_eot": ":"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for j, (label, res) in enumerate(curves.items()):
        for attack, acc in res["accuracy"].items():
            ax.plot(res["snr_db"], acc, styles.get(attack, "-."), color=f"C{j}", marker="o", ms=3,
                    label=f"{label}, {attack}")
    ax.axvline(threshold_db, color="0.5", lw=0.8)
    ax.text(threshold_db, 2, f" {threshold_db:g} dB", color="0.4", fontsize=7)
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("accuracy on correctly classified images (%)")
    ax.set_ylim(0, 101)
    ax.set_title(plot_title(curves), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
