"""Tile-major patch gather for the analog layer, with a col2im backward.

Like :mod:`rapa.functional`'s fast path, the patches of every tile are read straight
out of an ``as_strided`` view of the (padded) input into ``(nt, N*M, k)``, once each, so
that tile ``j``'s patch matrix ``cols[j]`` can go to analog array ``j``. The backward
writes the patch gradients (from the arrays' backward passes) back into pixel order
and folds them (col2im) into the input gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rapa.functional import conv_output_size


def rows_total(n: int, np_: int, has_empty: bool) -> int:
    """Rows of a flat (N*np, ...) scatter buffer, plus one to discard empty slots."""
    return n * np_ + (1 if has_empty else 0)


class _GatherPatches(torch.autograd.Function):
    """``x`` (N, C, H, W) -> tile-major patches ``(nt, N*M, k)``."""

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, empty: Tensor | None, mask: Tensor | None, dest: Tensor,
                kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], out_size: tuple[int, int], covered: bool) -> Tensor:
        n, c, h, w = x.shape
        kh, kw = kernel_size
        oh, ow = out_size
        nt, _, m = p.shape  # p (nt, N, M): pixel read by every slot
        xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
        s_n, s_c, s_h, s_w = xp.stride()
        patches = xp.as_strided(  # (N, oh, ow, C, kh, kw) view, no copy
            (n, oh, ow, c, kh, kw),
            (s_n, s_h * stride[0], s_w * stride[1], s_c, s_h * dilation[0], s_w * dilation[1]),
        )
        nn_ = torch.arange(n, device=x.device).view(1, n, 1)  # (1, N, 1)
        cols = patches[nn_, p // ow, p % ow]  # (nt, N, M, C, kh, kw): every patch gathered once
        if mask is not None:  # image_pad: zero the reads outside the pixel's own region
            cols = cols * mask[p].view(nt, n, m, 1, kh, kw)
        if empty is not None:  # empty slots send a zero patch
            cols = cols.masked_fill(empty.view(nt, n, m, 1, 1, 1), 0)
        ctx.save_for_backward(p, dest, mask)
        ctx.meta = (x.shape, kernel_size, stride, padding, dilation, out_size, empty is not None, covered)
        return cols.reshape(nt, n * m, c * kh * kw)  # (nt, N*M, k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, dest, mask = ctx.saved_tensors
        (n, c, h, w), (kh, kw), stride, padding, dilation, (oh, ow), has_empty, covered = ctx.meta
        nt, _, m = p.shape
        k = c * kh * kw
        np_ = oh * ow
        if mask is not None:
            grad = (grad.reshape(nt, n, m, c, kh * kw) * mask[p].view(nt, n, m, 1, kh * kw)).reshape(nt, n * m, k)
        buf = (grad.new_empty if covered else grad.new_zeros)(rows_total(n, np_, has_empty), k)
        buf.index_copy_(0, dest, grad.reshape(-1, k))  # back to pixel order (empty slots: last row)
        buf = buf[: n * np_].view(n, np_, k).transpose(1, 2)  # (N, k, np)
        grad_x = F.fold(buf, (h, w), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return grad_x, None, None, None, None, None, None, None, None, None, None


def gather_patches(x: Tensor, index: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], mask: Tensor | None = None,
                   covered: bool = True) -> tuple[Tensor, Tensor, bool]:
    """Patches of every tile ``(nt, N*M, k)``, their destination rows ``(nt*N*M,)`` in a
    ``(N*np [+1], cout)`` output buffer, and whether there are empty slots (whose rows
    are the extra last one).

    ``index`` (B, nt, M) is a gather index from :mod:`rapa.schemes` (B in {1, N}, value
    ``np`` marks an empty slot); ``mask`` (np, kh*kw) zeroes reads (``image_pad``);
    ``covered`` says the index is a partition of the pixels (not ``perforated``).
    """
    n = x.shape[0]
    oh, ow = conv_output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    np_ = oh * ow
    _, nt, m = index.shape
    idx = index.to(x.device).transpose(0, 1).expand(nt, n, m)  # (nt, N, M)
    empty = idx == np_
    has_empty = bool(empty.any())
    dest = torch.arange(n, device=x.device).view(1, n, 1) * np_ + idx  # (nt, N, M)
    if has_empty:
        dest = torch.where(empty, n * np_, dest)
    p = idx.clamp(max=np_ - 1)  # (nt, N, M): empty slots read pixel np-1, then zeroed
    dest = dest.reshape(-1)
    cols = _GatherPatches.apply(x, p, empty if has_empty else None, mask, dest, kernel_size, stride,
                                padding, dilation, (oh, ow), covered)
    return cols, dest, has_empty
