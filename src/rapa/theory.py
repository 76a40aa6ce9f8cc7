"""Implicit regularisation by replicated parameters: the logistic regression of paper §3.5-3.6.

Every parameter ``theta_l`` of a logistic regression is replicated over ``nt`` tiles,
``theta`` of shape ``(nt, d)``. The paper's model (§3.5) retrieves, every time ``theta_l``
is accessed, the replica ``theta[s_l, l]`` with ``s_l`` drawn uniformly and independently
for every parameter: ``sampling="parameter"``, ``nt**d`` equally likely vectors ``theta_s``.
The RAPA layer instead picks one tile for a whole patch: ``sampling="tile"``, ``nt``
equally likely vectors ``theta_s = theta[s]``. In both models the average of ``theta_s``
is ``theta_bar = theta.mean(0)`` and, the log-likelihood being linear in ``theta`` except
for ``A``,

    <L(theta_s)>_s = L(theta_bar) + R,    R = sum_i <A(x_i . theta_s)>_s - A(x_i . theta_bar) >= 0.

A second-order Taylor expansion of ``A`` around ``x_i . theta_bar`` (§3.6) gives
``R ~ 1/2 sum_i p_i (1 - p_i) Var_s(x_i . theta_s)``. Only under per-parameter sampling
are the ``s_l`` independent, so that ``Var_s(x_i . theta_s) = sum_l x_il^2 Var_s(theta_l)``
(the paper's formula, ``Var_s`` the population variance of ``theta_l`` over its replicas);
under tile sampling the replicas' covariance enters, ``x_i^T C x_i``.

Everything here is float64 torch and self-contained. :func:`train_replicated_logreg` trains
the replicated model by SGD with a fresh random replica draw at every access, and
:func:`demo` compares it with the single-parameter model on two classes of scikit-learn's
digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

Sampling = Literal["parameter", "tile"]
SAMPLINGS: tuple[str, ...] = ("parameter", "tile")


def log_partition(z: Tensor) -> Tensor:
    """``A(z) = log(1 + e^z)``, exact to rounding for every ``z`` (no softplus threshold)."""
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def logistic_loss(theta: Tensor, X: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """Negative log-likelihood ``L(theta) = sum_i w_i (A(x_i.theta) - y_i x_i.theta)``.

    ``theta`` is one parameter vector ``(d,)`` or a batch ``(..., d)``; the result has the
    batch shape.
    """
    z = theta @ X.T  # (..., N)
    w = _weights(weights, X)
    return ((log_partition(z) - y * z) * w).sum(-1)


def replica_mean(theta: Tensor) -> Tensor:
    """``theta_bar``, the mean over replicas: ``(nt, d) -> (d,)``."""
    return theta.mean(0)


def replica_variance(theta: Tensor) -> Tensor:
    """``Var_s(theta_l)``, the population variance over replicas: ``(nt, d) -> (d,)``."""
    return theta.var(0, unbiased=False)


def _check(theta: Tensor, X: Tensor, sampling: str) -> None:
    if theta.dim() != 2:
        raise ValueError(f"theta must have shape (nt, d), got shape {tuple(theta.shape)}")
    if X.dim() != 2 or X.shape[1] != theta.shape[1]:
        raise ValueError(f"X must have shape (N, {theta.shape[1]}), got shape {tuple(X.shape)}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def _weights(weights: Tensor | None, X: Tensor) -> Tensor:
    if weights is None:
        return torch.ones(X.shape[0], dtype=X.dtype, device=X.device)
    if weights.shape != (X.shape[0],):
        raise ValueError(f"weights must have shape ({X.shape[0]},), got {tuple(weights.shape)}")
    return weights


def num_combinations(nt: int, d: int, sampling: Sampling = "parameter") -> int:
    """How many equally likely ``theta_s`` the sampling model has: ``nt**d`` or ``nt``."""
    return nt**d if sampling == "parameter" else nt


def enumerate_logits(
    theta: Tensor, X: Tensor, sampling: Sampling = "parameter", max_combinations: int = 2**20
) -> Tensor:
    """``x_i . theta_s`` for every equally likely ``s``: ``(N, M)``, ``M = nt**d`` or ``nt``.

    Per-parameter sampling builds the sums one parameter at a time (an outer sum per ``l``),
    so memory is ``N * nt**d``; more than ``max_combinations`` combinations is refused.
    """
    _check(theta, X, sampling)
    nt, d = theta.shape
    if sampling == "tile":
        return X @ theta.T  # (N, nt)
    m = num_combinations(nt, d, sampling)
    if m > max_combinations:
        raise ValueError(
            f"max_combinations={max_combinations} is below nt**d = {nt}**{d} = {m}; "
            "use regulariser_mc for this size"
        )
    z = torch.zeros(X.shape[0], 1, dtype=X.dtype, device=X.device)  # (N, 1)
    for l in range(d):  # d small: enumeration is only for checks
        z = (z[:, :, None] + X[:, l, None, None] * theta[None, None, :, l]).flatten(1)  # (N, M*nt)
    return z


def sample_replicas(
    theta: Tensor, n: int, sampling: Sampling = "parameter", generator: torch.Generator | None = None
) -> Tensor:
    """``n`` random ``theta_s``, ``(n, d)``: per parameter or per tile, uniform over replicas."""
    nt, d = theta.shape
    if sampling == "tile":
        s = torch.randint(nt, (n,), generator=generator, device=theta.device)  # (n,)
        return theta[s]  # (n, d)
    s = torch.randint(nt, (n, d), generator=generator, device=theta.device)  # (n, d)
    return theta.gather(0, s)  # (n, d): theta_s[j, l] = theta[s[j, l], l]


def replicated_loss(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    weights: Tensor | None = None,
    sampling: Sampling = "parameter",
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``<L(theta_s)>_s``, the expected negative log-likelihood under random replica choice.

    Exact (by enumeration of every ``s``) when ``n_samples`` is None, otherwise a Monte Carlo
    mean over ``n_samples`` draws.
    """
    _check(theta, X, sampling)
    w = _weights(weights, X)
    if n_samples is None:
        z = enumerate_logits(theta, X, sampling)  # (N, M)
    else:
        z = X @ sample_replicas(theta, n_samples, sampling, generator).T  # (N, n)
    per_s = log_partition(z) - y[:, None] * z  # (N, M)
    return (per_s.mean(1) * w).sum()


def regulariser_exact(
    theta: Tensor,
    X: Tensor,
    weights: Tensor | None = None,
    sampling: Sampling = "parameter",
    max_combinations: int = 2**20,
) -> Tensor:
    """``R = sum_i w_i (<A(x_i.theta_s)>_s - A(x_i.theta_bar))``, exact by enumeration.

    Per-parameter sampling (the paper's model) enumerates ``nt**d`` vectors, tile sampling
    ``nt``.
    """
    w = _weights(weights, X)
    z = enumerate_logits(theta, X, sampling, max_combinations)  # (N, M)
    z_bar = X @ replica_mean(theta)  # (N,)
    return ((log_partition(z).mean(1) - log_partition(z_bar)) * w).sum()


def regulariser_mc(
    theta: Tensor,
    X: Tensor,
    n_samples: int = 4096,
    weights: Tensor | None = None,
    sampling: Sampling = "parameter",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Unbiased Monte Carlo estimate of ``R`` from ``n_samples`` random ``theta_s``.

    Averages ``A(z) - A(z_bar) - sigmoid(z_bar) (z - z_bar)``: the last term has mean zero
    (``<z>_s = z_bar``) and cancels the first-order noise, so the relative error stays
    ``O(n_samples**-0.5)`` however small the replica spread.
    """
    _check(theta, X, sampling)
    w = _weights(weights, X)
    z = X @ sample_replicas(theta, n_samples, sampling, generator).T  # (N, n)
    z_bar = (X @ replica_mean(theta))[:, None]  # (N, 1)
    dev = log_partition(z) - log_partition(z_bar) - torch.sigmoid(z_bar) * (z - z_bar)  # (N, n)
    return (dev.mean(1) * w).sum()


def regulariser_second_order(
    theta: Tensor, X: Tensor, weights: Tensor | None = None, sampling: Sampling = "parameter"
) -> Tensor:
    """Second-order ``R ~ 1/2 sum_i w_i p_i (1 - p_i) Var_s(x_i . theta_s)``, ``p_i = sigmoid(x_i.theta_bar)``.

    Per-parameter sampling: ``Var_s(x_i.theta_s) = sum_l x_il^2 Var_s(theta_l)`` (paper §3.6).
    Tile sampling: ``x_i^T C x_i`` with ``C`` the population covariance of the replicas.
    """
    _check(theta, X, sampling)
    w = _weights(weights, X)
    p = torch.sigmoid(X @ replica_mean(theta))  # (N,)
    if sampling == "parameter":
        var_z = (X**2) @ replica_variance(theta)  # (N,)
    else:
        var_z = (X @ (theta - replica_mean(theta)).T).pow(2).mean(1)  # (N,)
    return 0.5 * (w * p * (1 - p) * var_z).sum()


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """A trained (replicated) logistic regression and its learning curves."""

    theta: Tensor
    """The replicas, ``(nt, d)``; ``nt = 1`` is the single-parameter model."""
    sampling: str
    """How replicas were drawn in training and are drawn in evaluation."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """Every ``record_every`` epochs (from epoch 0, before training; and after the last):
    ``epoch``, ``train_error``, ``train_loss`` and, given a test set, ``test_error``,
    ``test_loss`` (errors as fractions, losses per sample)."""


def evaluate(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    sampling: Sampling = "parameter",
    n_draws: int = 64,
    seed: int = 0,
) -> tuple[float, float]:
    """Expected 0-1 error and log-loss per sample of the randomly sampled model.

    Exact over the ``nt`` tiles for tile sampling; over ``n_draws`` random ``theta_s`` (the
    same for every sample, from ``seed``) for per-parameter sampling. ``nt = 1`` is exact.
    """
    nt = theta.shape[0]
    if nt == 1 or sampling == "tile":
        z = X @ theta.T  # (N, nt)
    else:
        gen = torch.Generator(device=theta.device).manual_seed(seed)
        z = X @ sample_replicas(theta, n_draws, sampling, gen).T  # (N, n_draws)
    err = ((z > 0).to(X.dtype) != y[:, None]).to(X.dtype).mean()
    loss = (log_partition(z) - y[:, None] * z).mean()
    return float(err), float(loss)


def train_replicated_logreg(
    X: Tensor,
    y: Tensor,
    nt: int,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 10,
    sampling: Sampling = "parameter",
    init_std: float = 0.01,
    X_test: Tensor | None = None,
    y_test: Tensor | None = None,
    record_every: int = 1,
) -> TrainResult:
    """Train a logistic regression whose parameters are replicated over ``nt`` tiles by SGD.

    Every sample of every minibatch draws its own ``theta_s`` (per parameter, or one tile
    for the whole vector, as the RAPA layer picks a tile per patch); the gradient of its
    loss goes to the replicas it used. The minibatch loss is the mean over its samples.
    ``nt = 1`` is plain SGD on a single parameter vector. Learning curves are recorded every
    ``record_every`` epochs (0: none).
    """
    if nt < 1:
        raise ValueError(f"nt must be >= 1, got {nt}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if record_every < 0:
        raise ValueError(f"record_every must be >= 0, got {record_every}")
    n, d = X.shape
    gen = torch.Generator(device=X.device).manual_seed(seed)
    theta = init_std * torch.randn(nt, d, generator=gen, dtype=X.dtype, device=X.device)
    cols = torch.arange(d, device=X.device)  # (d,)
    history: dict[str, list[float]] = {}
    sets = [("train", X, y)]
    if (X_test is None) != (y_test is None):
        raise ValueError("X_test and y_test must be given together")
    if X_test is not None and y_test is not None:
        sets.append(("test", X_test, y_test))

    def record(epoch: int) -> None:
        if record_every == 0 or (epoch % record_every and epoch != epochs):
            return
        history.setdefault("epoch", []).append(epoch)
        for name, Xe, ye in sets:
            err, loss = evaluate(theta, Xe, ye, sampling, seed=seed)
            history.setdefault(f"{name}_error", []).append(err)
            history.setdefault(f"{name}_loss", []).append(loss)

    record(0)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen, device=X.device)  # (n,)
        for idx in order.split(batch_size):
            xb, yb = X[idx], y[idx]  # (B, d), (B,)
            b = idx.numel()
            if sampling == "parameter":
                s = torch.randint(nt, (b, d), generator=gen, device=X.device)  # (B, d)
                theta_s = theta[s, cols]  # (B, d)
            else:
                s = torch.randint(nt, (b,), generator=gen, device=X.device)  # (B,)
                theta_s = theta[s]  # (B, d)
            z = (xb * theta_s).sum(1)  # (B,)
            grad = (torch.sigmoid(z) - yb)[:, None] * xb / b  # (B, d): dloss/dtheta_s
            if sampling == "parameter":
                theta.index_put_((s, cols.expand(b, d)), -lr * grad, accumulate=True)
            else:
                theta.index_add_(0, s, -lr * grad)
        record(epoch)
    return TrainResult(theta=theta, sampling=sampling, history=history)


# --------------------------------------------------------------------------- demonstration


def digits_pair(
    classes: tuple[int, int] = (1, 8), n_train: int = 30, split_seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two classes of scikit-learn's 8x8 digits (bundled, no download), float64.

    Pixels scaled to [0, 1] plus a constant-1 column (the bias, replicated like the
    weights), so ``d = 65``; label 1 for ``classes[1]``. A fixed random split (``split_seed``)
    keeps ``n_train`` samples for training and the rest for testing.
    """
    from sklearn.datasets import load_digits

    a, b = classes
    if a == b or not (0 <= a <= 9 and 0 <= b <= 9):
        raise ValueError(f"classes must be two different digits 0-9, got {classes}")
    data = load_digits()
    keep = (data.target == a) | (data.target == b)
    X = torch.as_tensor(data.data[keep] / 16.0, dtype=torch.float64)  # (n, 64)
    X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)  # (n, 65)
    y = torch.as_tensor(data.target[keep] == b, dtype=torch.float64)  # (n,)
    if not 2 <= n_train < X.shape[0]:
        raise ValueError(f"n_train must be in [2, {X.shape[0]}), got {n_train}")
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(split_seed))
    tr, te = perm[:n_train], perm[n_train:]
    return X[tr], y[tr], X[te], y[te]


def regulariser_vs_spread(
    theta: Tensor,
    X: Tensor,
    scales: Sequence[float],
    sampling: Sampling = "parameter",
    n_samples: int = 4096,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``R`` and its second-order form when the replicas' deviations from ``theta_bar`` are
    scaled by each of ``scales``. ``R`` is exact for tile sampling, Monte Carlo
    (:func:`regulariser_mc`, ``n_samples`` draws) for per-parameter sampling."""
    mean = replica_mean(theta)  # (d,)
    out: dict[str, list[float]] = {"scale": [], "R": [], "R_second_order": []}
    for c in scales:
        th = mean + c * (theta - mean)  # (nt, d)
        out["scale"].append(float(c))
        out["R"].append(float(_regulariser(th, X, sampling, n_samples, seed)))
        out["R_second_order"].append(float(regulariser_second_order(th, X, sampling=sampling)))
    return out


def _regulariser(theta: Tensor, X: Tensor, sampling: Sampling, n_samples: int, seed: int) -> Tensor:
    if sampling == "tile":
        return regulariser_exact(theta, X, sampling="tile")
    gen = torch.Generator(device=theta.device).manual_seed(seed)
    return regulariser_mc(theta, X, n_samples, sampling="parameter", generator=gen)


SPREAD_SCALES: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-6, 3))
"""Scales of the replica spread for :func:`regulariser_vs_spread` in :func:`demo`."""


def demo(
    nt: int = 16,
    epochs: int = 200,
    lr: float = 1.0,
    seed: int = 0,
    classes: tuple[int, int] = (1, 8),
    n_train: int = 30,
    batch_size: int = 10,
    sampling: Sampling = "parameter",
    n_samples: int = 4096,
    record_every: int = 1,
    spread_scales: Sequence[float] = SPREAD_SCALES,
) -> dict:
    """Replicated (``nt`` tiles) vs single logistic regression with the same SGD budget.

    Returns a JSON-ready dict: the settings; for ``single``, ``replicated`` (randomly sampled,
    as trained) and ``replicated_mean`` (``theta_bar``) the final train/test error and log-loss
    and their gaps (errors as fractions: ``train_error``, ``test_error``, ``error_gap_fraction``);
    ``R`` (exact for tile sampling, Monte Carlo with ``n_samples`` draws for per-parameter
    sampling, whose ``nt**65`` combinations cannot be enumerated) and
    ``R_second_order`` on the training set; the learning curves (every ``record_every``
    epochs); ``R`` against replica spread (at ``spread_scales``).
    """
    Xtr, ytr, Xte, yte = digits_pair(classes, n_train)
    single, rep = (
        train_replicated_logreg(Xtr, ytr, n, epochs, lr, seed, batch_size, sampling,
                                X_test=Xte, y_test=yte, record_every=record_every)
        for n in (1, nt)
    )

    def summary(theta: Tensor, samp: Sampling) -> dict[str, float]:
        tr_err, tr_loss = evaluate(theta, Xtr, ytr, samp, seed=seed)
        te_err, te_loss = evaluate(theta, Xte, yte, samp, seed=seed)
        return {"train_error": tr_err, "test_error": te_err, "error_gap_fraction": te_err - tr_err,
                "train_loss": tr_loss, "test_loss": te_loss, "loss_gap": te_loss - tr_loss}

    r_method = "exact" if sampling == "tile" else f"monte-carlo ({n_samples} draws)"
    return {
        "settings": {"nt": nt, "epochs": epochs, "lr": lr, "seed": seed, "classes": list(classes),
                     "n_train": n_train, "n_test": int(Xte.shape[0]), "batch_size": batch_size,
                     "sampling": sampling, "d": int(Xtr.shape[1])},
        "single": summary(single.theta, sampling),
        "replicated": summary(rep.theta, sampling),
        "replicated_mean": summary(replica_mean(rep.theta)[None], sampling),
        "R": float(_regulariser(rep.theta, Xtr, sampling, n_samples, seed)),
        "R_method": r_method,
        "R_second_order": float(regulariser_second_order(rep.theta, Xtr, sampling=sampling)),
        "history": {"single": single.history, "replicated": rep.history},
        "spread": regulariser_vs_spread(rep.theta, Xtr, spread_scales, sampling, n_samples, seed),
    }
