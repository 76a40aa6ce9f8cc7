"""The patch plan of the PyTorch path: where every slot of a gather index reads and writes.

A tiled convolution's slots (the entries of a gather index (B, nt, M), :mod:`rapa.schemes`)
are processed tile-major, in chunks of images (:func:`chunk_order`). :class:`PatchPlan`
turns the index into the rows of the padded channels-last input that each slot's patch is
made of and the output pixel that each slot writes; :mod:`rapa.ops.torch_path` gathers and
multiplies with it. :func:`gather_patches` hands the analog layer every tile's patch matrix
(``(nt, N*M, K)``, for one analog array per tile), read as whole ``(C, kh, kw)`` blocks from a
padded ``(N, Hp, C, Wp)`` copy of the input, with a col2im backward.
"""

from __future__ import annotations

import math

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


def _pad_scratch(role: str, xv: Tensor, padding: tuple[int, int], wdim: int) -> Tensor:
    """Zero-padded copy in scratch ``role`` of ``xv``, a permuted view of an (N, C, H, W) input
    with H at dim 1 and W at dim ``wdim``: H and W grow by ``2 * padding``."""
    ph, pw = padding
    h, w = xv.shape[1], xv.shape[wdim]
    shape = list(xv.shape)
    shape[1], shape[wdim] = h + 2 * ph, w + 2 * pw
    xp = scratch.get(role, math.prod(shape), xv).view(shape)
    if ph:
        xp.narrow(1, 0, ph).zero_()
        xp.narrow(1, ph + h, ph).zero_()
    rows = xp.narrow(1, ph, h)
    if pw:
        rows.narrow(wdim, 0, pw).zero_()
        rows.narrow(wdim, pw + w, pw).zero_()
    rows.narrow(wdim, pw, w).copy_(xv)
    return xp


def pad_nhwc(x: Tensor, padding: tuple[int, int]) -> Tensor:
    """Zero-padded channels-last copy of ``x`` (N, C, H, W) in scratch: ``(N, Hp, Wp, C)``."""
    return _pad_scratch("xp", x.permute(0, 2, 3, 1), padding, 2)


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



def slot_order(index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The pixel and the image of every slot of ``index`` (B, nt, M) for ``n`` images, flat in
    ``(nt, N, M)`` order (tile-major: tile ``j``'s slots are rows ``j*N*M ... (j+1)*N*M``)."""
    _, nt, m = index.shape
    idx = index.expand(n, nt, m).transpose(0, 1).reshape(-1)  # (L,) pixel of every slot, np = empty
    img = scratch.memo(("img_t", n, nt, m, index.device), lambda: torch.arange(n, device=index.device)
                       .view(1, n, 1).expand(nt, n, m).reshape(-1))  # (L,)
    return idx, img


def pad_nhcw(x: Tensor, padding: tuple[int, int]) -> Tensor:
    """Zero-padded ``(N, Hp, C, Wp)`` copy of ``x`` (N, C, H, W) in scratch: every patch of a
    pixel is then one strided block ``(C, kh, kw)`` in ``nn.Conv2d``'s weight order."""
    return _pad_scratch("xp_nhcw", x.permute(0, 2, 1, 3), padding, 3)


class _GatherPatches(torch.autograd.Function):
    """``x`` (N, C, H, W) -> the patches of every tile ``(nt, N*M, K)`` in ``(C, kh, kw)``
    order (``nn.Conv2d``'s weight order), and the slot of every output pixel; the backward
    adds the patch gradients back into their windows.

    Forward: one ``index_select`` of whole ``(C, kh, kw)`` blocks from an overlapping strided
    view of the padded ``(N, Hp, C, Wp)`` input (no im2col of the whole input, no transposed
    copy). Backward: the slot gradients are put in pixel order by the inverse of the
    assignment (an ``index_select``: a partition's slots are a permutation of the pixels) and
    added into the padded channels-last gradient one kernel offset at a time (col2im).
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, mask: Tensor | None, geo: ConvGeometry,
                covered: bool) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
        np_, ow = geo.num_pixels, geo.out_size[1]
        nt, m = index.shape[1:]
        idx, img = slot_order(index, n)  # (L,), (L,)
        num_slots = idx.numel()
        has_empty = nt * m != np_ if covered else bool((idx == np_).any())
        p = idx.clamp(max=np_ - 1) if has_empty else idx  # (L,) empty slots read pixel np-1
        xp = pad_nhcw(x, geo.padding)  # (N, Hp, C, Wp) scratch
        hp, wp = xp.shape[1], xp.shape[3]
        span = (kh - 1) * dh * c * wp + (c - 1) * wp + (kw - 1) * dw  # last entry of a block
        src = xp.view(-1).as_strided((xp.numel() - span, c, kh, kw), (1, wp, dh * c * wp, dw))
        start = (img * hp + p.div(ow, rounding_mode="floor") * sh) * (c * wp) + (p % ow) * sw  # (L,)
        cols = src.index_select(0, start).view(num_slots, c, kh * kw)  # (L, C, kh*kw), a fresh tensor
        if mask is not None:  # image_pad: zero the reads outside the pixel's own region
            cols = cols * mask[p].unsqueeze(1)
        if has_empty:  # empty slots send a zero patch
            cols = cols.masked_fill((idx == np_).view(-1, 1, 1), 0)
        # the slot of every output pixel (num_slots: a pixel no slot computes, perforated)
        dest = torch.add(idx, img, alpha=np_)  # (L,) output pixel of every slot
        if has_empty:  # empty slots write to an extra row, dropped below
            dest.masked_fill_(idx == np_, n * np_)
        inv = torch.full((n * np_ + 1,), num_slots, dtype=torch.int64, device=x.device)
        inv[dest] = scratch.arange(num_slots, x.device)
        inv = inv[: n * np_]  # (N*np,)
        ctx.save_for_backward(p, inv, mask)
        ctx.meta = (x.shape, x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous(), geo, covered)
        ctx.mark_non_differentiable(inv)
        return cols.view(nt, n * m, c * kh * kw), inv

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_inv: Tensor | None):
        p, inv, mask = ctx.saved_tensors
        (n, c, h, w), channels_last, geo, covered = ctx.meta
        (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
        (oh, ow), (ph, pw) = geo.out_size, geo.padding
        k = c * kh * kw
        grad = grad.reshape(-1, k)  # (L, K)
        if mask is not None:
            grad = (grad.view(-1, c, kh * kw) * mask[p].unsqueeze(1)).view(-1, k)
        if not covered:  # pixels without a slot read a zero row
            grad = torch.cat([grad, grad.new_zeros(1, k)])
        gv = grad.index_select(0, inv).view(n, oh, ow, c, kh, kw)  # pixel order
        gxp = grad.new_zeros(n, h + 2 * ph, w + 2 * pw, c)  # (N, Hp, Wp, C)
        for ky in range(kh):  # col2im, one kernel offset at a time: kh*kw strided adds
            y0 = ky * dh
            for kx in range(kw):
                x0 = kx * dw
                gxp[:, y0:y0 + (oh - 1) * sh + 1:sh, x0:x0 + (ow - 1) * sw + 1:sw] += gv[..., ky, kx]
        grad_x = gxp[:, ph:ph + h, pw:pw + w].permute(0, 3, 1, 2)  # (N, C, H, W), x's memory format:
        return grad_x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), \
            None, None, None, None


def gather_patches(x: Tensor, index: Tensor, geo: ConvGeometry, mask: Tensor | None = None,
                   covered: bool = True) -> tuple[Tensor, Tensor]:
    """The patches of every tile ``(nt, N*M, K)``, ``K`` in ``(C, kh, kw)`` order, and the slot
    of every output pixel ``(N*np,)`` (a row of the tiles' stacked ``(nt*N*M, cout)`` outputs;
    ``nt*N*M`` for a pixel that no slot computes); differentiable in ``x``.

    ``x`` (N, C, H, W) is already padded by all but the zero padding ``geo.padding``;
    ``index`` (B, nt, M) is a gather index (:mod:`rapa.schemes`), ``mask`` (np, kh*kw) zeroes
    reads (``image_pad``), ``covered``: the index is a partition of the pixels.
    """
    return _GatherPatches.apply(x, index.to(device=x.device, dtype=torch.int64), mask, geo, covered)
