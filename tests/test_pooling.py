"""Stochastic, mixed and the selectable pooling layers against slow references (SPEC §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from scipy import stats

from rapa.pooling import MixedPool2d, StochasticPool2d, make_pool, mixed_pool2d, stochastic_pool2d


def _regions(x: torch.Tensor, k: int, s: int, p: int):
    """Yield ``(n, c, oy, ox, values)`` of every pooling region; values are the in-image pixels."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    for b in range(n):
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    vals = [x[b, ch, y, xx].item()
                            for y in range(oy * s - p, oy * s - p + k)
                            for xx in range(ox * s - p, ox * s - p + k)
                            if 0 <= y < h and 0 <= xx < w]
                    yield b, ch, oy, ox, vals


def _slow_pool(x: torch.Tensor, k: int, s: int, p: int, fn) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.zeros(n, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, dtype=x.dtype)
    for b, ch, oy, ox, vals in _regions(x, k, s, p):
        out[b, ch, oy, ox] = fn(vals)
    return out


def _slow_stochastic_eval(vals):
    den = sum(vals)
    return 0.0 if den == 0 else sum(v * v for v in vals) / den


# ---------------------------------------------------------------- stochastic pooling

def test_stochastic_sampling_frequencies_match_probabilities():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 0.5, 6.0], dtype=torch.float64)
    draws = 40000
    x = a.view(1, 1, 3, 3).expand(draws, 1, 3, 3).contiguous()
    g = torch.Generator().manual_seed(1)
    out = stochastic_pool2d(x, 3, 1, 0, training=True, generator=g).flatten()  # one region per image
    picked = (out.view(-1, 1) == a.view(1, -1)).double()  # (draws, 9): values are distinct but for 0
    assert torch.all(picked.sum(1) >= 1)  # every output is a value of the region
    assert not torch.any(out == 0)  # zero activations have probability 0
    positive = a > 0
    observed = picked[:, positive].sum(0).numpy()
    expected = (a[positive] / a.sum() * draws).numpy()
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_stochastic_gradient_goes_to_the_picked_pixel():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    out = stochastic_pool2d(x, 3, 2, 1, training=True)
    out.sum().backward()
    # every output pixel read exactly one input pixel holding its value
    for b, ch, oy, ox, vals in _regions(x.detach(), 3, 2, 1):
        assert any(math.isclose(v, out[b, ch, oy, ox].item()) for v in vals)
    assert x.grad.sum().item() == pytest.approx(out.numel())
    assert torch.all((x.grad == 0) | (x.grad >= 1))


@pytest.mark.parametrize("size,k,s,p,cells", [((3, 3), 3, 1, 0, 9), ((2, 2), 3, 2, 1, 4)])
def test_stochastic_all_zero_region_is_uniform_over_its_pixels(size, k, s, p, cells):
    draws = 18000
    x = torch.zeros(draws, 1, *size, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    out = stochastic_pool2d(x, k, s, p, training=True, generator=g)
    assert out.shape == (draws, 1, 1, 1) and torch.all(out == 0)
    out.sum().backward()  # the gradient marks the picked pixel
    counts = x.grad.sum(0).flatten()
    assert counts.sum().item() == draws and counts.numel() == cells
    assert stats.chisquare(counts.numpy(), [draws / cells] * cells).pvalue > 1e-3


@pytest.mark.parametrize("geom", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_stochastic_eval_equals_slow_loop(geom):
    torch.manual_seed(3)
    x = torch.relu(torch.randn(2, 3, 7, 6, dtype=torch.float64))
    x[0, 0] = 0  # a channel with all-zero regions
    k, s, p = geom
    ref = _slow_pool(x, k, s, p, _slow_stochastic_eval)
    out = stochastic_pool2d(x, k, s, p, training=False)
    torch.testing.assert_close(out, ref)
    pool = StochasticPool2d(k, s, p).eval()
    torch.testing.assert_close(pool(x), ref)


def test_stochastic_eval_is_differentiable_without_nans():
    x = torch.relu(torch.randn(2, 2, 6, 6, dtype=torch.float64))
    x[:, 0] = 0
    x.requires_grad_(True)
    stochastic_pool2d(x, training=False).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_stochastic_eval_is_the_mean_of_training_samples():
    torch.manual_seed(4)
    x = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    draws = x.expand(20000, 1, 3, 3).contiguous()
    mean = stochastic_pool2d(draws, 3, 1, 0, training=True).mean().item()
    assert mean == pytest.approx(stochastic_pool2d(x, 3, 1, 0, training=False).item(), rel=0.02)


def test_stochastic_generator_makes_draws_repeatable():
    x = torch.rand(4, 3, 8, 8)
    a = stochastic_pool2d(x, generator=torch.Generator().manual_seed(7))
    b = stochastic_pool2d(x, generator=torch.Generator().manual_seed(7))
    c = stochastic_pool2d(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- mixed pooling

def test_mixed_pool_at_init_equals_slow_max_avg_mix():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    pool = MixedPool2d(3, dtype=torch.float64)
    alpha = 1 / (1 + math.exp(-10 * 0.2))
    ref = alpha * _slow_pool(x, 3, 2, 1, max) + (1 - alpha) * _slow_pool(x, 3, 2, 1, lambda v: sum(v) / len(v))
    torch.testing.assert_close(pool(x), ref)
    torch.testing.assert_close(pool.alpha, torch.full((3,), alpha, dtype=torch.float64))


def test_mixed_pool_alpha_per_channel_and_learnable():
    torch.manual_seed(6)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    pool = MixedPool2d(2, dtype=torch.float64)
    with torch.no_grad():
        pool.beta.copy_(torch.tensor([10.0, -10.0]))  # alpha ~ (1, 0): max and avg
    out = pool(x)
    torch.testing.assert_close(out[:, 0], nn.functional.max_pool2d(x, 3, 2, 1)[:, 0])
    torch.testing.assert_close(out[:, 1], _slow_pool(x, 3, 2, 1, lambda v: sum(v) / len(v))[:, 1])
    pool.reset_parameters()
    pool(x).sum().backward()
    assert pool.beta.grad is not None and torch.all(pool.beta.grad != 0)
    with pytest.raises(ValueError, match="alpha"):
        mixed_pool2d(x, torch.ones(3))


def test_mixed_pool_rejects_bad_channels():
    with pytest.raises(ValueError, match="num_channels=0"):
        MixedPool2d(0)


# ---------------------------------------------------------------- factory and geometry

@pytest.mark.parametrize("kind,cls", [("max", nn.MaxPool2d), ("avg", nn.AvgPool2d),
                                      ("stochastic", StochasticPool2d), ("mixed", MixedPool2d)])
@pytest.mark.parametrize("sizes", [(32, 16, 8, 4), (28, 14, 7, 4)])
def test_make_pool_kinds_and_sizes(kind, cls, sizes):
    pool = make_pool(kind, 4)
    assert isinstance(pool, cls)
    for s_in, s_out in zip(sizes, sizes[1:]):
        for training in (True, False):
            pool.train(training)
            assert pool(torch.rand(2, 4, s_in, s_in)).shape == (2, 4, s_out, s_out)


def test_make_pool_avg_divides_by_in_image_pixels():
    x = torch.rand(1, 2, 7, 7, dtype=torch.float64)
    ref = _slow_pool(x, 3, 2, 1, lambda v: sum(v) / len(v))
    torch.testing.assert_close(make_pool("avg", 2)(x), ref)


def test_make_pool_rejects_bad_kind_and_geometry():
    with pytest.raises(ValueError, match="'median'"):
        make_pool("median", 4)
    with pytest.raises(ValueError, match="padding"):
        make_pool("stochastic", 4, kernel_size=3, stride=2, padding=2)
    with pytest.raises(ValueError, match="stride"):
        StochasticPool2d(3, 0, 1)
