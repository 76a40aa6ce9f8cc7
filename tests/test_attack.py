"""FGSM by SNR, EOT and PGD (SPEC §4, Fig. 7) against closed forms on a linear model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rapa.analysis.attack import (accuracy_at, check_snrs, fgsm, gap_reduction, input_gradient, pgd,
                                  robustness_curve, snr_epsilon)
from rapa.cli import main
from rapa.models import ConvNet


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _linear(seed=0, d=64, k=10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def _closed_form_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of the summed cross-entropy of a linear softmax model: W^T (softmax - onehot)."""
    lin = model[1]
    with torch.no_grad():
        p = torch.softmax(x.flatten(1) @ lin.weight.T + lin.bias, 1)
        return ((p - F.one_hot(y, p.shape[1])) @ lin.weight).view_as(x)


@pytest.fixture(scope="module")
def digits():
    """8x8 digits, normalised, and a linear softmax classifier trained on them (about a second)."""
    from rapa.data import load_dataset, make_loader

    xs = {}
    for split in ("train", "test"):
        data = load_dataset("digits", split, size=8)
        xs[split] = next(iter(make_loader(data, len(data))))
    model = _linear(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = xs["train"]
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), xs["test"]


def _tiled(seed=0) -> ConvNet:
    g = torch.Generator().manual_seed(seed)
    net = ConvNet(num_classes=4, in_channels=1, channels=(4, 4, 4), tiles=(4, 4, 1), image_size=8, generator=g)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


@pytest.mark.parametrize("snr", [10.0, 33.0, 50.0, -5.0])
def test_fgsm_hits_the_requested_snr(snr):
    model = _linear()
    x = torch.randn(5, 1, 8, 8) * torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0]).view(5, 1, 1, 1)
    y = torch.tensor([0, 3, 5, 7, 9])
    adv = fgsm(model, x, y, snr)
    xn, dn = x.flatten(1).double().numpy(), (adv - x).flatten(1).double().numpy()
    measured = 20 * np.log10(np.linalg.norm(xn, axis=1) / np.linalg.norm(dn, axis=1))
    np.testing.assert_allclose(measured, snr, atol=1e-3)
    eps = np.linalg.norm(xn, axis=1) / (10 ** (snr / 20) * math.sqrt(64))  # SPEC §4
    ulp = 2e-7 * np.abs(xn).max()  # x + delta is rounded to float32
    np.testing.assert_allclose(np.abs(dn), np.repeat(eps[:, None], 64, 1), rtol=1e-5, atol=ulp)
    g = _closed_form_grad(model, x, y)
    assert torch.equal(torch.sign(adv - x), torch.sign(g))  # direction: the signed loss gradient
    np.testing.assert_allclose(snr_epsilon(x, snr).numpy(), eps, rtol=1e-5)


def test_infinite_snr_changes_nothing(digits):
    model, (x, y) = digits
    assert torch.equal(fgsm(model, x[:50], y[:50], 1e9), x[:50])
    assert torch.equal(fgsm(model, x[:50], y[:50], float("inf")), x[:50])
    net = _tiled()
    xt = torch.randn(4, 1, 8, 8)
    assert torch.equal(fgsm(net, xt, torch.tensor([0, 1, 2, 3]), 1e9, eot=2), xt)
    with pytest.raises(ValueError, match="snr_db"):
        fgsm(model, x[:2], y[:2], float("nan"))


def test_eot_gradient_is_the_mean_over_draws():
    net = _tiled()
    net.train()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    state = net.generator.get_state()  # the net draws its assignments from its generator
    got = input_gradient(net, x, y, eot=3)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())  # restored
    net.generator.set_state(state)
    net.eval()
    grads = []
    for _ in range(3):
        xx = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(net(xx), y, reduction="sum"), xx)[0])
    torch.testing.assert_close(got, torch.stack(grads).mean(0))
    assert not torch.allclose(grads[0], grads[1])  # the draws differ: EOT averages something


def test_deterministic_model_gradient_is_closed_form():
    model = _linear()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(input_gradient(model, x, y, eot=5), _closed_form_grad(model, x, y))


def test_pgd_stays_in_the_ball_and_lowers_accuracy(digits):
    model, (x, y) = digits
    x, y = x[:100], y[:100]
    for snr in (15.0, 30.0):
        adv = pgd(model, x, y, snr, steps=5, eot=2, generator=torch.Generator().manual_seed(0))
        eps = snr_epsilon(x, snr).view(-1, 1, 1, 1)
        assert bool(((adv - x).abs() <= eps * (1 + 1e-5)).all())
        snr_got = 20 * torch.log10(x.flatten(1).norm(dim=1) / (adv - x).flatten(1).norm(dim=1))
        assert bool((snr_got >= snr - 1e-3).all())
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        attacked = (model(pgd(model, x, y, 10.0, steps=5)).argmax(1) == y).float().mean()
    assert attacked < clean


def test_robustness_curve_matches_closed_form(digits):
    model, (x, y) = digits
    snrs = (10.0, 20.0, 30.0, 40.0, 50.0)
    res = robustness_curve(model, (x, y), snrs, attacks=("fgsm", "fgsm_eot"), batch_size=128)
    # independent: numpy float64, closed-form gradient of the linear model
    w, b = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    xn, yn = x.flatten(1).double().numpy(), y.numpy()
    ok = (xn @ w.T + b).argmax(1) == yn
    xc, yc = xn[ok], yn[ok]
    logits = xc @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sign = np.sign((p - np.eye(10)[yc]) @ w)
    assert res["images"] == len(yn) and res["correct"] == int(ok.sum())
    assert res["stochastic"] is False and res["eot"] == 1
    for i, snr in enumerate(snrs):
        eps = np.linalg.norm(xc, axis=1, keepdims=True) / (10 ** (snr / 20) * 8)
        acc = 100 * np.mean(((xc + eps * sign) @ w.T + b).argmax(1) == yc)
        assert res["accuracy"]["fgsm"][i] == pytest.approx(acc, abs=100 / len(yc) + 1e-9)
    acc = res["accuracy"]["fgsm"]
    assert all(0 <= a <= 100 for a in acc)
    assert acc[0] <= acc[-1] and acc[-1] > 90 and acc[0] < 80  # weak noise barely hurts, strong does
    assert res["accuracy"]["fgsm_eot"] == acc  # a deterministic net: EOT is the same attack


def test_robustness_curve_stochastic_net():
    net = _tiled()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 4, (12,))
    torch.manual_seed(0)
    res = robustness_curve(net, (x, y), (10, 30, 50), eot=2, pgd_steps=2, batch_size=5, limit=10)
    assert res["images"] == 10 and res["stochastic"] is True and res["eot"] == 2
    assert set(res["accuracy"]) == {"fgsm", "fgsm_eot", "pgd_eot"}
    assert all(0 <= a <= 100 or math.isnan(a) for v in res["accuracy"].values() for a in v)
    assert net.training  # mode restored


def test_gap_reduction_and_interpolation():
    assert gap_reduction(83.97, 55.0) == pytest.approx(28.97 / 45)
    assert gap_reduction(62.0, 25.0) == pytest.approx(37 / 75)  # the paper's CIFAR-100+ 25% -> 62%: 49%
    assert gap_reduction(40.0, 50.0) == pytest.approx(-0.2)
    assert math.isnan(gap_reduction(100.0, 100.0))
    with pytest.raises(ValueError, match="acc_base"):
        gap_reduction(50.0, 120.0)
    assert accuracy_at([10, 30, 35, 50], [5, 60, 70, 90], 33) == pytest.approx(66.0)
    assert accuracy_at([35, 30], [70, 60], 33) == pytest.approx(66.0)  # order does not matter
    assert accuracy_at([10, 20], [1, 2], 33) != accuracy_at([10, 20], [1, 2], 33)  # NaN outside


def test_check_snrs():
    assert check_snrs([10, 50.5]) == (10.0, 50.5)
    for bad in ([200], [-30], [float("nan")], []):
        with pytest.raises(ValueError):
            check_snrs(bad)
    with pytest.raises(ValueError, match="snr=200"):
        robustness_curve(_linear(), (torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)), [200])


def test_cli_attack(digits_runs, tmp_path, capsys):
    rc = main(["attack", str(digits_runs / "tiled"), "--baseline", str(digits_runs / "base"), "--snr", "10,30,50",
               "--limit", "20", "--eot", "2", "--pgd-steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "gap reduction" in out and "33 dB" in out
    res = json.loads((tmp_path / "attack.json").read_text())
    assert res["snr_db"] == [10, 30, 50] and res["test_images"] == 20 and res["snr_space"] == "pixel"
    assert set(res["curves"]) == {"model", "baseline"}
    assert res["curves"]["model"]["stochastic"] and not res["curves"]["baseline"]["stochastic"]
    for curve in res["curves"].values():
        assert set(curve["accuracy_percent"]) == {"fgsm", "fgsm_eot", "pgd_eot"}
        assert all(a is None or 0 <= a <= 100 for v in curve["accuracy_percent"].values() for a in v)
    for attack, row in res["at_threshold"].items():
        m = res["curves"]["model"]["accuracy_percent"][attack]
        b = res["curves"]["baseline"]["accuracy_percent"][attack]
        if None not in m and None not in b:  # 33 dB lies between 30 and 50: linear interpolation
            model, base = row["model_accuracy_percent"], row["baseline_accuracy_percent"]
            assert model == pytest.approx(m[1] + (m[2] - m[1]) * 3 / 20)
            if base < 100:
                assert row["gap_reduction_fraction"] == pytest.approx((model - base) / (100 - base))
    assert (tmp_path / "attack.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_attack_errors(digits_runs, tmp_path, capsys):
    tiled = str(digits_runs / "tiled")
    for argv, msg in ((["--snr", "10,500"], "outside the range"), (["--snr", "ten"], "comma-separated"),
                      (["--baseline", str(tmp_path / "none")], "no run directory"),
                      (["--attacks", "cw"], "cw"), (["--eot", "0"], "--eot")):
        assert main(["attack", tiled, "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_snr_is_measured_on_pixel_space_images():
    """With the dataset's normalisation the SNR is that of the pixel images x*std+mean and their
    perturbation (what a person sees), not of the normalised inputs."""
    from rapa.analysis.attack import measured_snr, pixel_epsilon

    torch.manual_seed(0)
    mean, std = (0.2860,), (0.3530,)
    pixels = torch.rand(6, 1, 28, 28)  # pixel values in [0, 1]
    x = (pixels - mean[0]) / std[0]  # the model's inputs
    direction = torch.randn_like(x).sign()
    for snr in (20.0, 33.0):
        adv = x + pixel_epsilon(x, snr, (mean, std)) * direction
        adv_pixels = adv * std[0] + mean[0]
        got = 20 * torch.log10(pixels.flatten(1).norm(dim=1) / (adv_pixels - pixels).flatten(1).norm(dim=1))
        torch.testing.assert_close(got, torch.full((6,), snr), rtol=0, atol=1e-3)
        # the same step measured on the normalised inputs gives another SNR
        assert (measured_snr(x, adv) - snr).abs().min() > 0.5
    # three channels: the step in the model's space is scaled by 1/std per channel
    mean3, std3 = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x3 = torch.randn(2, 3, 4, 4)
    eps = pixel_epsilon(x3, 30.0, (mean3, std3))
    assert eps.shape == (2, 3, 1, 1)
    torch.testing.assert_close(eps[:, 0] * 0.2, eps[:, 2] * 0.3)
