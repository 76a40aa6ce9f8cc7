"""Caffe's local response normalisation in ``WITHIN_CHANNEL`` mode (SPEC §2).

Caffe builds it from layers: square, AVE pooling over a ``local_size x local_size``
window with zero padding ``local_size // 2`` (stride 1, so every window lies inside the
padded input and the mean always divides by ``local_size^2``), power
``(1 + alpha * mean)^(-beta)``, product with the input. PyTorch's
``nn.LocalResponseNorm`` normalises across channels instead and is not this.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _check(local_size: int, alpha: float, beta: float) -> None:
    if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1 or local_size % 2 == 0:
        raise ValueError(f"local_size={local_size!r} must be a positive odd integer")
    if alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0")
    if beta < 0:
        raise ValueError(f"beta={beta!r} must be >= 0")


def within_channel_lrn(x: Tensor, local_size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> Tensor:
    """``x / (1 + alpha * mean(x^2))^beta``, the mean over a ``local_size^2`` spatial window
    of the same channel, zero-padded at the borders (always divided by ``local_size^2``)."""
    _check(local_size, alpha, beta)
    if x.dim() != 4:
        raise ValueError(f"input of shape {tuple(x.shape)}: expected a 4-D batch (N, C, H, W)")
    mean_sq = F.avg_pool2d(x * x, local_size, 1, local_size // 2, count_include_pad=True)  # (N, C, H, W)
    return x / (1 + alpha * mean_sq).pow(beta)


class WithinChannelLRN(nn.Module):
    """Module form of :func:`within_channel_lrn` (Caffe ``LRN``, ``norm_region: WITHIN_CHANNEL``)."""

    def __init__(self, local_size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        _check(local_size, alpha, beta)
        self.local_size = local_size
        self.alpha = alpha
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        return within_channel_lrn(x, self.local_size, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"local_size={self.local_size}, alpha={self.alpha}, beta={self.beta}"
