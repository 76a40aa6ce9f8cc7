"""rapa.theory: replicated logistic regression (paper §3.5-3.6) against plain-Python references."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from rapa import theory as T
from rapa.cli import main

DT = torch.float64


# ----------------------------------------------------------------- slow, independent references


def ref_A(z: float) -> float:
    """log(1 + e^z) in plain Python floats."""
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def ref_combos(theta: torch.Tensor, sampling: str) -> list[list[float]]:
    """Every equally likely theta_s as a list of floats."""
    th = theta.tolist()
    nt, d = len(th), len(th[0])
    if sampling == "tile":
        return [list(row) for row in th]
    return [[th[s[l]][l] for l in range(d)] for s in itertools.product(range(nt), repeat=d)]


def ref_dot(x: list[float], t: list[float]) -> float:
    return math.fsum(a * b for a, b in zip(x, t))


def ref_expected_loss(theta, X, y, w, sampling) -> float:
    """<L(theta_s)>_s: the loss of every theta_s, averaged."""
    Xl, yl, wl = X.tolist(), y.tolist(), w.tolist()
    losses = []
    for t in ref_combos(theta, sampling):
        losses.append(math.fsum(wi * (ref_A(ref_dot(x, t)) - yi * ref_dot(x, t))
                                for x, yi, wi in zip(Xl, yl, wl)))
    return math.fsum(losses) / len(losses)


def ref_R(theta, X, w, sampling) -> float:
    """R = sum_i w_i (<A(x_i.theta_s)>_s - A(x_i.theta_bar)), straight from the definition."""
    combos = ref_combos(theta, sampling)
    th = theta.tolist()
    bar = [math.fsum(row[l] for row in th) / len(th) for l in range(len(th[0]))]
    total = []
    for x, wi in zip(X.tolist(), w.tolist()):
        mean_A = math.fsum(ref_A(ref_dot(x, t)) for t in combos) / len(combos)
        total.append(wi * (mean_A - ref_A(ref_dot(x, bar))))
    return math.fsum(total)


def ref_loss(t, X, y, w) -> float:
    return math.fsum(wi * (ref_A(ref_dot(x, t)) - yi * ref_dot(x, t))
                     for x, yi, wi in zip(X.tolist(), y.tolist(), w.tolist()))


def problem(nt: int, d: int, n: int, seed: int, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < 0.5).to(DT)
    w = torch.rand(n, generator=g, dtype=DT) + 0.5
    theta = torch.randn(d, generator=g, dtype=DT) + spread * torch.randn(nt, d, generator=g, dtype=DT)
    return theta, X, y, w


CASES = [(2, 5, 7, 0), (3, 4, 6, 1), (4, 3, 5, 2), (5, 2, 9, 3)]


# ----------------------------------------------------------------- A and the identity


def test_log_partition_matches_reference_and_is_stable():
    z = torch.tensor([-800.0, -40.0, -20.5, -1.0, 0.0, 1e-8, 0.7, 20.5, 40.0, 800.0], dtype=DT)
    got = T.log_partition(z)
    assert torch.isfinite(got).all()
    for zi, gi in zip(z.tolist(), got.tolist()):
        assert gi == pytest.approx(ref_A(zi), rel=1e-15, abs=1e-300)


@pytest.mark.parametrize("sampling", ["parameter", "tile"])
@pytest.mark.parametrize("nt,d,n,seed", CASES)
def test_identity_expected_loss_equals_mean_loss_plus_R(sampling, nt, d, n, seed):
    theta, X, y, w = problem(nt, d, n, seed)
    expected = ref_expected_loss(theta, X, y, w, sampling)
    got = T.replicated_loss(theta, X, y, w, sampling=sampling)
    assert float(got) == pytest.approx(expected, abs=1e-10)
    bar = theta.mean(0)
    assert float(T.logistic_loss(bar, X, y, w)) == pytest.approx(ref_loss(bar.tolist(), X, y, w), abs=1e-10)
    r = T.regulariser_exact(theta, X, w, sampling=sampling)
    assert float(r) == pytest.approx(ref_R(theta, X, w, sampling), abs=1e-10)
    assert float(T.logistic_loss(bar, X, y, w) + r) == pytest.approx(expected, abs=1e-10)


def test_parameter_sampling_enumerates_nt_pow_d():
    theta, X, _, _ = problem(3, 4, 2, 0)
    assert T.enumerate_logits(theta, X, "parameter").shape == (2, 81)
    assert T.enumerate_logits(theta, X, "tile").shape == (2, 3)
    with pytest.raises(ValueError, match="max_combinations"):
        T.regulariser_exact(theta, X, max_combinations=80)


# ----------------------------------------------------------------- properties of R


@pytest.mark.parametrize("sampling", ["parameter", "tile"])
def test_R_nonnegative(sampling):
    for seed in range(20):
        theta, X, _, w = problem(3, 4, 5, 100 + seed, spread=0.1 + seed / 5)
        assert float(T.regulariser_exact(theta, X, w, sampling=sampling)) >= 0.0
        assert float(T.regulariser_second_order(theta, X, w, sampling=sampling)) >= 0.0


@pytest.mark.parametrize("sampling", ["parameter", "tile"])
def test_R_zero_for_identical_replicas(sampling):
    _, X, _, w = problem(1, 5, 6, 7)
    theta = torch.randn(1, 5, generator=torch.Generator().manual_seed(0), dtype=DT).expand(4, 5)
    assert abs(float(T.regulariser_exact(theta, X, w, sampling=sampling))) < 1e-13
    assert abs(float(T.regulariser_second_order(theta, X, w, sampling=sampling))) < 1e-13


def test_second_order_formula_matches_paper_definition():
    theta, X, _, w = problem(4, 5, 6, 11)
    th, Xl = theta.tolist(), X.tolist()
    nt, d = len(th), len(th[0])
    bar = [sum(r[l] for r in th) / nt for l in range(d)]
    var = [sum((r[l] - bar[l]) ** 2 for r in th) / nt for l in range(d)]  # population variance
    ref = 0.0
    for x, wi in zip(Xl, w.tolist()):
        p = 1 / (1 + math.exp(-ref_dot(x, bar)))
        ref += 0.5 * wi * p * (1 - p) * sum(x[l] ** 2 * var[l] for l in range(d))
    assert float(T.regulariser_second_order(theta, X, w)) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("sampling,nt", [("parameter", 3), ("parameter", 2), ("tile", 3)])
def test_second_order_error_vanishes_with_spread(sampling, nt):
    g = torch.Generator().manual_seed(5)
    d = 5
    X = torch.randn(8, d, generator=g, dtype=DT)
    bar = 0.5 * torch.randn(d, generator=g, dtype=DT)
    dev = torch.randn(nt, d, generator=g, dtype=DT)
    dev = dev - dev.mean(0)
    rel = []
    for c in (1e-1, 1e-2, 1e-3):
        theta = bar + c * dev
        exact = float(T.regulariser_exact(theta, X, sampling=sampling))
        approx = float(T.regulariser_second_order(theta, X, sampling=sampling))
        rel.append(abs(exact - approx) / exact)
    assert rel[0] > rel[1] > rel[2]
    assert rel[1] < 0.3 * rel[0] and rel[2] < 0.3 * rel[1]  # at least linear in the spread
    assert rel[2] < 1e-3
    if nt == 2:  # two replicas: symmetric deviations, no third cumulant, quadratic convergence
        assert rel[2] < 0.02 * rel[1]


def test_paper_formula_needs_independent_per_parameter_sampling():
    """With one tile per sample, correlated replica deviations enter R, which the paper's
    diagonal formula misses; the covariance form (sampling="tile") gets them."""
    g = torch.Generator().manual_seed(3)
    X = torch.rand(6, 4, generator=g, dtype=DT) + 0.5  # positive inputs
    bar = 0.3 * torch.randn(4, generator=g, dtype=DT)
    dev = torch.tensor([[1.0], [-1.0]], dtype=DT) * torch.ones(1, 4, dtype=DT)  # fully correlated
    theta = bar + 1e-3 * dev
    exact_tile = float(T.regulariser_exact(theta, X, sampling="tile"))
    assert float(T.regulariser_second_order(theta, X, sampling="tile")) == pytest.approx(exact_tile, rel=1e-3)
    diagonal = float(T.regulariser_second_order(theta, X, sampling="parameter"))
    assert exact_tile > 2.0 * diagonal
    exact_param = float(T.regulariser_exact(theta, X, sampling="parameter"))
    assert diagonal == pytest.approx(exact_param, rel=1e-3)


@pytest.mark.parametrize("sampling", ["parameter", "tile"])
def test_monte_carlo_agrees_with_enumeration(sampling):
    theta, X, y, w = problem(3, 6, 5, 21, spread=0.5)
    gen = torch.Generator().manual_seed(0)
    exact = float(T.regulariser_exact(theta, X, w, sampling=sampling))
    mc = float(T.regulariser_mc(theta, X, 20000, w, sampling=sampling, generator=gen))
    assert mc == pytest.approx(exact, rel=0.05)
    loss = float(T.replicated_loss(theta, X, y, w, sampling=sampling))
    loss_mc = float(T.replicated_loss(theta, X, y, w, sampling=sampling, n_samples=20000, generator=gen))
    assert loss_mc == pytest.approx(loss, rel=0.02)


def test_bad_arguments_rejected():
    theta, X, _, _ = problem(2, 3, 4, 0)
    with pytest.raises(ValueError, match="theta"):
        T.regulariser_exact(theta[0], X)
    with pytest.raises(ValueError, match="X"):
        T.regulariser_second_order(theta, X[:, :2])
    with pytest.raises(ValueError, match="sampling"):
        T.regulariser_mc(theta, X, sampling="pixel")
    with pytest.raises(ValueError, match="nt"):
        T.train_replicated_logreg(X, X[:, 0] > 0, 0, 1, 0.1, 0)


# ----------------------------------------------------------------- training and the demonstration


@pytest.mark.parametrize("sampling", ["parameter", "tile"])
def test_one_full_batch_step_from_zero_is_gradient_descent(sampling):
    """From theta = 0 every theta_s is 0, so one full-batch step puts the whole mean-loss
    gradient X^T (1/2 - y) / N on the replicas: theta_bar moves by lr / nt times it."""
    _, X, y, _ = problem(1, 4, 12, 9)
    nt, lr = 5, 0.3
    res = T.train_replicated_logreg(X, y, nt, 1, lr, seed=0, batch_size=12, sampling=sampling, init_std=0.0)
    grad = X.T @ (0.5 - y) / 12
    torch.testing.assert_close(res.theta.mean(0), -lr / nt * grad, rtol=1e-12, atol=1e-14)
    single = T.train_replicated_logreg(X, y, 1, 1, lr, seed=0, batch_size=12, init_std=0.0)
    torch.testing.assert_close(single.theta[0], -lr * grad, rtol=1e-12, atol=1e-14)


def test_replicated_model_overfits_less():
    for seed in (0, 1, 2):
        r = T.demo(nt=16, epochs=200, lr=1.0, seed=seed, n_samples=256, record_every=0, spread_scales=())
        single, rep = r["single"], r["replicated"]
        assert single["train_error"] == 0.0 and single["error_gap_fraction"] > 0.08  # the single model overfits
        assert rep["error_gap_fraction"] < single["error_gap_fraction"] - 0.015
        assert rep["loss_gap"] < 0.7 * single["loss_gap"]
        assert rep["test_error"] < single["test_error"] + 0.02  # not bought by a much worse model
        assert r["R"] > 0 and r["R_second_order"] == pytest.approx(r["R"], rel=0.25)


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "th"
    assert main(["theory", "--nt", "4", "--epochs", "5", "--seed", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "single" in text and "replicated nt=4" in text
    result = json.loads((out / "theory.json").read_text())
    assert result["settings"]["nt"] == 4 and result["history"]["single"]["epoch"] == list(range(6))
    assert (out / "theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["theory", "--nt", "0", "--out", str(out)]) == 2
    assert main(["theory", "--classes", "3", "3", "--out", str(out)]) == 2


def test_learning_curves_recorded_every_k_epochs():
    _, X, y, _ = problem(1, 3, 10, 4)
    y = (y > 0.5).to(DT)
    h = T.train_replicated_logreg(X, y, 2, 7, 0.1, 0, X_test=X, y_test=y, record_every=3).history
    assert h["epoch"] == [0, 3, 6, 7]
    assert h["train_error"] == h["test_error"] and len(h["test_loss"]) == 4
    assert T.train_replicated_logreg(X, y, 2, 7, 0.1, 0, record_every=0).history == {}
