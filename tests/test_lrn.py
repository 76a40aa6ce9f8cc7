"""Caffe's WITHIN_CHANNEL LRN against a slow loop over pixels (SPEC §2)."""

from __future__ import annotations

import pytest
import torch

from rapa.lrn import WithinChannelLRN, within_channel_lrn


def _slow_lrn(x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
    """Caffe: zero-padded window sum of squares divided by size^2, in the same channel."""
    n, c, h, w = x.shape
    r = size // 2
    out = torch.empty_like(x)
    for b in range(n):
        for ch in range(c):
            for y in range(h):
                for xx in range(w):
                    sq = sum(x[b, ch, yy, xq].item() ** 2
                             for yy in range(y - r, y + r + 1) for xq in range(xx - r, xx + r + 1)
                             if 0 <= yy < h and 0 <= xq < w)
                    out[b, ch, y, xx] = x[b, ch, y, xx] / (1 + alpha * sq / size**2) ** beta
    return out


@pytest.mark.parametrize("size,alpha,beta", [(3, 5e-5, 0.75), (3, 0.5, 0.75), (5, 0.2, 1.5), (1, 1.0, 0.5)])
def test_lrn_equals_slow_loop(size, alpha, beta):
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 3, 6, 7, dtype=torch.float64)
    ref = _slow_lrn(x, size, alpha, beta)
    torch.testing.assert_close(within_channel_lrn(x, size, alpha, beta), ref)
    torch.testing.assert_close(WithinChannelLRN(size, alpha, beta)(x), ref)


def test_lrn_defaults_are_caffe_cifar10_full():
    x = 50 * torch.rand(1, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(WithinChannelLRN()(x), _slow_lrn(x, 3, 5e-5, 0.75))
    assert not torch.allclose(WithinChannelLRN()(x), x)  # it does normalise


def test_lrn_channels_are_independent():
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    y = x.clone()
    y[:, 1] *= 100
    a, b = within_channel_lrn(x, 3, 0.5), within_channel_lrn(y, 3, 0.5)
    torch.testing.assert_close(a[:, [0, 2]], b[:, [0, 2]])


@pytest.mark.parametrize("kw,match", [(dict(local_size=2), "local_size=2"), (dict(alpha=-1.0), "alpha=-1.0"),
                                      (dict(beta=-0.5), "beta=-0.5")])
def test_lrn_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        WithinChannelLRN(**kw)
