"""The patch plan of the PyTorch path: where every slot of a gather index reads and writes.

A tiled convolution's slots (the entries of a gather index (B, nt, M), :mod:`rapa.schemes`)
are processed tile-major, in chunks of images (:func:`chunk_order`). :class:`PatchPlan`
turns the index into the rows of the padded channels-last input that each slot's patch is
made of and the output pixel that each slot writes; :mod:`rapa.ops.torch_path` gathers and
multiplies with it, and :func:`gather_patches` hands the analog layer every tile's patch
matrix (``(nt, N*M, K)``, for one analog array per tile) with a col2im backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rapa.ops.geometry import ConvGeometry
from rapa.ops.workspace import scratch


def chunk_order(a: Tensor, step: int) -> Tensor:
    """Flatten ``a`` (N, nt, M) in the order the chunks process it: chunk by chunk of
    ``step`` images, tile-major inside a chunk, ``(chunk, nt, image, M)``."""
    n = a.shape[0]
    q = n // step
    parts = []
    if q:
        parts.append(a[: q * step].view(q, step, *a.shape[1:]).transpose(1, 2).reshape(-1))
    if n > q * step:
        parts.append(a[q * step:].transpose(0, 1).reshape(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class PatchPlan:
    """Index arithmetic of one tiled convolution, flat in chunk order (:func:`chunk_order`).

    ``rows`` (L*kh,): the row of the gather source that every slot's kernel rows read;
    ``dest`` (L,): the flat output pixel ``img*np + p`` of every slot (``N*np``: empty slot);
    ``p`` (L,): the pixel every slot reads (empty slots read pixel ``np-1``).
    """

    def __init__(self, index: Tensor, n: int, padded_hw: tuple[int, int], out_size: tuple[int, int],
                 kh: int, stride: tuple[int, int], dilation: tuple[int, int], step: int,
                 covered: bool, strided: bool):
        _, nt, m = index.shape
        oh, ow = out_size
        np_ = oh * ow
        hp, wp = padded_hw
        dev = index.device
        idx_c = chunk_order(index.expand(n, nt, m), step)  # (L,) pixel of every slot, np = empty
        img_c = scratch.memo(("img_c", n, nt, m, step, dev), lambda: chunk_order(
            torch.arange(n, device=dev).view(n, 1, 1).expand(n, nt, m), step))  # (L,) image of every slot
        # a partition lists every pixel once, so it has empty slots iff nt*M != np
        self.has_empty = nt * m != np_ if covered else bool((idx_c == np_).any())
        self.p = idx_c.clamp(max=np_ - 1) if self.has_empty else idx_c
        row_len = wp if strided else ow  # source rows per padded input row

        def offsets() -> tuple[Tensor, Tensor]:
            # the source row where a pixel's first kernel row starts, within one image; the
            # offsets of the other kernel rows
            oy = torch.arange(oh, device=dev).view(oh, 1) * stride[0]
            ox = torch.arange(ow, device=dev).view(1, ow)
            pix = (oy * wp + ox * stride[1] if strided else oy * ow + ox).view(-1)  # (np,)
            return pix, torch.arange(kh, device=dev) * (dilation[0] * row_len)  # (np,), (kh,)

        pix, ky = scratch.memo(("pix", oh, ow, wp, kh, stride, dilation, strided, dev), offsets)
        base = pix.index_select(0, self.p).add_(img_c, alpha=hp * row_len)  # (L,)
        self.rows = (base.unsqueeze(1) + ky).view(-1)  # (L*kh,)
        dest = torch.add(idx_c, img_c, alpha=np_)
        if self.has_empty:
            dest = torch.where(idx_c == np_, n * np_, dest)
        self.dest = dest  # (L,)


def pad_nhwc(x: Tensor, padding: tuple[int, int]) -> Tensor:
    """Zero-padded channels-last copy of ``x`` (N, C, H, W) in scratch: ``(N, Hp, Wp, C)``."""
    n, c, h, w = x.shape
    ph, pw = padding
    hp, wp = h + 2 * ph, w + 2 * pw
    xp = scratch.get("xp", n * hp * wp * c, x).view(n, hp, wp, c)  # (N, Hp, Wp, C)
    if ph:
        xp[:, :ph].zero_()
        xp[:, ph + h:].zero_()
    if pw:
        xp[:, ph:ph + h, :pw].zero_()
        xp[:, ph:ph + h, pw + w:].zero_()
    xp[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    return xp


def gather_source(xp: Tensor, kw: int, stride: tuple[int, int], dilation: tuple[int, int],
                   ow: int) -> tuple[Tensor, bool]:
    """The matrix whose rows the patches are made of, and whether it is the strided view.

    With dilation 1 across, a kernel row of a patch is ``kw*C`` contiguous numbers of the
    padded channels-last input, so the source is an overlapping view of it (no copy);
    otherwise it is the row-unfolded input ``(N*Hp*ow, kw*C)``."""
    n, hp, wp, c = xp.shape
    if dilation[1] == 1:
        return xp.view(-1).as_strided((n * hp * wp - kw + 1, kw * c), (c, 1)), True
    ew = dilation[1] * (kw - 1) + 1
    u = xp.unfold(2, ew, stride[1])[..., :: dilation[1]]  # (N, Hp, ow, C, kw)
    return u.transpose(3, 4).reshape(n * hp * ow, kw * c), False


def window_table(in_hw: tuple[int, int], out_size: tuple[int, int], kernel_size: tuple[int, int],
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                  device: torch.device) -> Tensor:
    """For every input pixel and kernel offset, the output pixel whose patch reads that input
    pixel at that offset, ``(H*W*kh*kw,)`` in ``(y, x, ky, kx)`` order; ``np`` where none does."""
    (h, w), (oh, ow), (kh, kw) = in_hw, out_size, kernel_size
    ty = torch.arange(h, device=device).view(h, 1, 1, 1) + padding[0] \
        - torch.arange(kh, device=device).view(1, 1, kh, 1) * dilation[0]  # (H, 1, kh, 1): oy*sh
    tx = torch.arange(w, device=device).view(1, w, 1, 1) + padding[1] \
        - torch.arange(kw, device=device).view(1, 1, 1, kw) * dilation[1]  # (1, W, 1, kw): ox*sw
    oy, ox = ty.div(stride[0], rounding_mode="floor"), tx.div(stride[1], rounding_mode="floor")
    valid = (ty >= 0) & (ty % stride[0] == 0) & (oy < oh) & (tx >= 0) & (tx % stride[1] == 0) & (ox < ow)
    return torch.where(valid, oy * ow + ox, oh * ow).view(-1)  # (H*W*kh*kw,)



class _GatherPatches(torch.autograd.Function):
    """``x`` (N, C, H, W) -> the patches of every tile ``(nt, N*M, K)`` in ``(C, kh, kw)``
    order (``nn.Conv2d``'s weight order); the backward folds the patch gradients (col2im)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, mask: Tensor | None, geo: ConvGeometry,
                covered: bool) -> tuple[Tensor, Tensor]:
        n, c = x.shape[:2]
        (kh, kw), np_ = geo.kernel, geo.num_pixels
        nt, m = index.shape[1:]
        xp = pad_nhwc(x, geo.padding)  # (N, Hp, Wp, C) scratch
        src, strided = gather_source(xp, kw, geo.stride, geo.dilation, geo.out_size[1])
        # one chunk of all N images: slots in (nt, N, M) order, tile j's rows are cols[j]
        plan = PatchPlan(index, n, xp.shape[1:3], geo.out_size, kh, geo.stride, geo.dilation, n, covered,
                         strided)
        cols = src.index_select(0, plan.rows).view(-1, kh * kw, c)  # (L, kh*kw, C), a fresh tensor
        if mask is not None:  # image_pad: zero the reads outside the pixel's own region
            cols = cols * mask[plan.p].unsqueeze(-1)
        if plan.has_empty:  # empty slots send a zero patch
            cols = cols.masked_fill((plan.dest == n * np_).view(-1, 1, 1), 0)
        ctx.save_for_backward(plan.p, plan.dest, mask)
        ctx.meta = (x.shape, geo, plan.has_empty, covered)
        ctx.mark_non_differentiable(plan.dest)
        return cols.transpose(1, 2).reshape(nt, n * m, c * kh * kw), plan.dest

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_dest: Tensor | None):
        p, dest, mask = ctx.saved_tensors
        (n, c, h, w), geo, has_empty, covered = ctx.meta
        kh, kw = geo.kernel
        k, np_ = c * kh * kw, geo.num_pixels
        grad = grad.reshape(-1, k)  # (L, K)
        if mask is not None:
            grad = (grad.view(-1, c, kh * kw) * mask[p].unsqueeze(1)).view(-1, k)
        rows = n * np_ + int(has_empty)  # empty slots write to the extra last row
        buf = (grad.new_empty if covered else grad.new_zeros)(rows, k)
        buf.index_copy_(0, dest, grad)  # back to pixel order
        buf = buf[: n * np_].view(n, np_, k).transpose(1, 2)  # (N, K, np)
        grad_x = F.fold(buf, (h, w), geo.kernel, dilation=geo.dilation, padding=geo.padding, stride=geo.stride)
        return grad_x, None, None, None, None


def gather_patches(x: Tensor, index: Tensor, geo: ConvGeometry, mask: Tensor | None = None,
                   covered: bool = True) -> tuple[Tensor, Tensor]:
    """The patches of every tile ``(nt, N*M, K)``, ``K`` in ``(C, kh, kw)`` order, and each
    slot's destination row ``(nt*N*M,)`` in a ``(N*np + 1, cout)`` output buffer (row
    ``N*np``: an empty slot, whose patch is zero); differentiable in ``x``.

    ``x`` (N, C, H, W) is already padded by all but the zero padding ``geo.padding``;
    ``index`` (B, nt, M) is a gather index (:mod:`rapa.schemes`), ``mask`` (np, kh*kw) zeroes
    reads (``image_pad``), ``covered``: the index is a partition of the pixels.
    """
    return _GatherPatches.apply(x, index.to(device=x.device, dtype=torch.int64), mask, geo, covered)
