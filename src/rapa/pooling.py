"""The selectable pooling layers of the paper's network (SPEC §2): stochastic and mixed.

``make_pool(kind, channels)`` builds any of ``max``, ``avg``, ``stochastic``, ``mixed``
with the network's geometry, 3x3 windows at stride 2 with padding 1, so that sizes go
32 -> 16 -> 8 -> 4 (and 28 -> 14 -> 7 -> 4), as Caffe's ceil-mode pooling does without
padding.

Padding conventions (the window of a border pixel reaches outside the input):

* ``max``: padded positions never win (PyTorch pads with ``-inf``), as in Caffe.
* ``avg``: ``count_include_pad=False``, the mean over the window's pixels inside the
  input. Caffe's AVE pooling divides by the window clipped to ``input + pad``; the
  ``cifar10_full`` net pools without padding, so Caffe divides by the in-image pixels
  there, which is what ``count_include_pad=False`` gives with our padding 1.
* ``stochastic``: padded positions read as 0, so they get probability 0; a region whose
  pixels are all 0 picks uniformly among its in-image pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from rapa.functional import _size2

POOL_KINDS: tuple[str, ...] = ("max", "avg", "stochastic", "mixed")


def _geometry(kernel_size: _size2, stride: _size2 | None, padding: _size2) -> tuple[tuple[int, int], ...]:
    """``(kernel_size, stride, padding)`` as pairs, validated; ``stride=None`` means the kernel size."""
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    p = _pair(padding)
    for name, value, low in (("kernel_size", k, 1), ("stride", s, 1), ("padding", p, 0)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
            raise ValueError(f"{name}={value!r} must be integers >= {low}")
    if any(2 * pv > kv for pv, kv in zip(p, k)):
        raise ValueError(f"padding={p!r} must be at most half of kernel_size={k!r}")
    return k, s, p


def stochastic_pool2d(
    x: Tensor,
    kernel_size: _size2 = 3,
    stride: _size2 | None = 2,
    padding: _size2 = 1,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Stochastic pooling (Zeiler & Fergus 2013) of a non-negative ``(N, C, H, W)`` batch.

    Training: every region outputs one of its activations ``a_i``, picked with probability
    ``a_i / sum(a)`` (uniform over its in-image pixels where all are 0); the gradient goes
    to the picked pixel. Evaluation: the probability-weighted average
    ``sum(a_i^2) / sum(a)`` (0 where ``sum(a) = 0``). Negative inputs count as 0 in the
    probabilities. Random numbers come from ``generator`` (else torch's global one).
    """
    if x.dim() != 4:
        raise ValueError(f"input of shape {tuple(x.shape)}: expected a 4-D batch (N, C, H, W)")
    (kh, kw), (sh, sw), (ph, pw) = _geometry(kernel_size, stride, padding)
    n, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    if hp < kh or wp < kw:
        raise ValueError(f"input of size {(h, w)} (padded {hp}x{wp}) is smaller than the window {(kh, kw)}")
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if not training:  # sum(a^2)/sum(a) as a ratio of two zero-padded window means
        a = x.clamp(min=0)
        num = F.avg_pool2d(a * a, (kh, kw), (sh, sw), (ph, pw), count_include_pad=True)  # (N, C, oh, ow)
        den = F.avg_pool2d(a, (kh, kw), (sh, sw), (ph, pw), count_include_pad=True)  # (N, C, oh, ow)
        nonzero = den > 0
        return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(den))

    xp = F.pad(x, (pw, pw, ph, ph))  # (N, C, Hp, Wp), zeros outside the input
    with torch.no_grad():
        ap = xp.detach().clamp(min=0).float()  # (N, C, Hp, Wp)
        s_n, s_c, s_h, s_w = ap.stride()
        win = (oh, ow, kh, kw)
        a = ap.as_strided((n, c, *win), (s_n, s_c, s_h * sh, s_w * sw, s_h, s_w))  # view, no copy
        a = a.reshape(n, c, oh * ow, kh * kw)  # (N, C, L, K) probability weights
        inside = F.pad(torch.ones(1, 1, h, w, device=x.device), (pw, pw, ph, ph))  # (1, 1, Hp, Wp)
        t_n, t_c, t_h, t_w = inside.stride()
        inside = inside.as_strided((1, 1, *win), (t_n, t_c, t_h * sh, t_w * sw, t_h, t_w))
        inside = inside.reshape(1, 1, oh * ow, kh * kw)  # (1, 1, L, K): 1 for in-image pixels
        total = a.sum(3, keepdim=True)  # (N, C, L, 1)
        weights = torch.where(total > 0, a, inside)  # (N, C, L, K): uniform where all are 0
        cum = weights.cumsum(3)  # (N, C, L, K)
        if generator is not None and torch.device(generator.device) != x.device:
            u = torch.rand(n, c, oh * ow, 1, generator=generator, device=generator.device).to(x.device)
        else:
            u = torch.rand(n, c, oh * ow, 1, generator=generator, device=x.device)  # (N, C, L, 1)
        u = u * cum[..., -1:]  # uniform on [0, sum of weights)
        r = (cum <= u).sum(3).clamp(max=kh * kw - 1)  # (N, C, L): picked index in the window
        ly = torch.arange(oh, device=x.device).repeat_interleave(ow)  # (L,) output row
        lx = torch.arange(ow, device=x.device).repeat(oh)  # (L,) output column
        flat = (ly * sh + r // kw) * wp + lx * sw + r % kw  # (N, C, L) position in the padded input
    return xp.flatten(2).gather(2, flat).view(n, c, oh, ow)  # (N, C, oh, ow)


class StochasticPool2d(nn.Module):
    """Module form of :func:`stochastic_pool2d`; samples in training, averages in evaluation."""

    def __init__(self, kernel_size: _size2 = 3, stride: _size2 | None = 2, padding: _size2 = 1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = _geometry(kernel_size, stride, padding)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        return stochastic_pool2d(x, self.kernel_size, self.stride, self.padding, self.training,
                                 self.generator)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def mixed_pool2d(x: Tensor, alpha: Tensor, kernel_size: _size2 = 3, stride: _size2 | None = 2,
                 padding: _size2 = 1) -> Tensor:
    """``alpha * max + (1 - alpha) * avg`` pooling, ``alpha`` of shape ``(C,)`` (one per channel).

    The average counts only in-image pixels (``count_include_pad=False``).
    """
    if x.dim() != 4:
        raise ValueError(f"input of shape {tuple(x.shape)}: expected a 4-D batch (N, C, H, W)")
    if alpha.shape != (x.shape[1],):
        raise ValueError(f"alpha of shape {tuple(alpha.shape)}: expected one value per channel ({x.shape[1]},)")
    k, s, p = _geometry(kernel_size, stride, padding)
    mx = F.max_pool2d(x, k, s, p)  # (N, C, oh, ow)
    av = F.avg_pool2d(x, k, s, p, count_include_pad=False)  # (N, C, oh, ow)
    a = alpha.view(1, -1, 1, 1)  # (1, C, 1, 1)
    return a * mx + (1 - a) * av


class MixedPool2d(nn.Module):
    """Mixed pooling with a learnable ``alpha_k = sigmoid(mu * beta_k)`` per channel.

    After Yu et al. (2014) as the paper uses it: ``mu = 10`` fixed, ``beta_k`` starts at
    ``2 / mu`` (``alpha = sigmoid(2) ~ 0.88``, a bias towards max pooling).
    """

    def __init__(self, num_channels: int, kernel_size: _size2 = 3, stride: _size2 | None = 2,
                 padding: _size2 = 1, mu: float = 10.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels={num_channels!r} must be a positive integer")
        if not mu > 0:
            raise ValueError(f"mu={mu!r} must be positive")
        self.num_channels = num_channels
        self.kernel_size, self.stride, self.padding = _geometry(kernel_size, stride, padding)
        self.mu = float(mu)
        self.beta = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``beta_k = 2 / mu``."""
        nn.init.constant_(self.beta, 2.0 / self.mu)

    @property
    def alpha(self) -> Tensor:
        """Mixing weight of max pooling per channel, ``sigmoid(mu * beta)``, shape ``(C,)``."""
        return torch.sigmoid(self.mu * self.beta)

    def forward(self, x: Tensor) -> Tensor:
        return mixed_pool2d(x, self.alpha, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, mu={self.mu}")


def make_pool(
    kind: str,
    channels: int,
    kernel_size: _size2 = 3,
    stride: _size2 = 2,
    padding: _size2 = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A pooling layer of ``kind`` (one of :data:`POOL_KINDS`) for ``channels`` channels."""
    k, s, p = _geometry(kernel_size, stride, padding)
    if kind == "max":
        return nn.MaxPool2d(k, s, p)
    if kind == "avg":
        return nn.AvgPool2d(k, s, p, count_include_pad=False)
    if kind == "stochastic":
        return StochasticPool2d(k, s, p, generator=generator)
    if kind == "mixed":
        return MixedPool2d(channels, k, s, p, device=device, dtype=dtype)
    raise ValueError(f"pooling kind={kind!r} is unknown; choose one of {', '.join(POOL_KINDS)}")
