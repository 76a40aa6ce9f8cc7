"""Functional RAPA convolution: ``np`` patches times one of ``nt`` kernel matrices each.

The fast path gathers every patch exactly once, straight into tile-major order
``(nt, N*M, k)``, runs one batched matmul per tile, and scatters the outputs back. Its
backward reuses the gathered patches for the weight gradient and skips the input
gradient when the input does not need it. MAC count equals ``F.conv2d``'s.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from rapa import schemes

_size2 = int | Sequence[int]


def conv_output_size(h: int, w: int, kernel_size: _size2, stride: _size2 = 1,
                     padding: _size2 = 0, dilation: _size2 = 1) -> tuple[int, int]:
    """Output height and width of a convolution, as ``nn.Conv2d`` computes them."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


def rows_total(n: int, np_: int, has_empty: bool) -> int:
    """Rows of a flat (N*np, ...) scatter buffer, plus one to discard empty slots."""
    return n * np_ + (1 if has_empty else 0)


def _row_unfold(x: Tensor, kw: int, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], ow: int) -> Tensor:
    """Rows ``(N*Hp*ow, kw*C)``: for padded input row ``y`` and output column ``ox`` the
    ``kw`` pixels (channels last) a kernel row reads. A patch is ``kh`` such rows."""
    n, c, h, w = x.shape
    ph, pw = padding
    xp = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)  # (N, Hp, Wp, C) channels last
    xp[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    ew = dilation[1] * (kw - 1) + 1
    u = xp.unfold(2, ew, stride[1])[..., :: dilation[1]]  # (N, Hp, ow, C, kw)
    return u.transpose(3, 4).reshape(n * (h + 2 * ph) * ow, kw * c)  # (N*Hp*ow, kw*C)


def _row_fold(gu: Tensor, x_shape, kw: int, stride, padding, dilation, ow: int) -> Tensor:
    """Adjoint of :func:`_row_unfold`: sum row gradients back onto the input (N, C, H, W)."""
    n, c, h, w = x_shape
    ph, pw = padding
    hp, wp = h + 2 * ph, w + 2 * pw
    gu = gu.view(n, hp, ow, kw, c)
    gxp = gu.new_zeros(n, hp, wp, c)  # (N, Hp, Wp, C)
    span = (ow - 1) * stride[1] + 1
    for kx in range(kw):  # kernel columns, not patches
        x0 = kx * dilation[1]
        gxp[:, :, x0:x0 + span:stride[1]] += gu[:, :, :, kx]
    return gxp[:, ph:ph + h, pw:pw + w].permute(0, 3, 1, 2)  # (N, C, H, W) channels-last memory


class _TiledConv2dFn(torch.autograd.Function):
    """Autograd function of the gather-matmul-scatter RAPA convolution.

    Patch entries are ordered ``(kh, kw, C)`` so that a patch is ``kh`` contiguous rows of
    a row-unfolded channels-last input, gathered with one ``index_select`` (a memcpy per row).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
                mask: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], out_size: tuple[int, int], covered: bool) -> Tensor:
        n, c, h, w = x.shape
        nt, cout, _, kh, kw = weight.shape
        k = c * kh * kw
        oh, ow = out_size
        np_ = oh * ow
        hp = h + 2 * padding[0]
        b, _, m = index.shape  # index (B, nt, M), B in {1, N}; value np = empty slot
        idx = index.transpose(0, 1).contiguous()  # (nt, B, M)
        # a partition lists every pixel once, so it has empty slots iff nt*M != np
        has_empty = nt * m != np_ if covered else bool((idx == np_).any())
        p = idx.clamp(max=np_ - 1)  # (nt, B, M) pixel read (empty slots read pixel np-1)
        nn_ = torch.arange(n, device=x.device).view(1, n, 1)  # (1, N, 1)

        # row of the row-unfolded input read by kernel row ky of every slot's patch
        top = (nn_ * hp + (p // ow) * stride[0]) * ow + p % ow  # (nt, N, M)
        ky = torch.arange(kh, device=x.device) * (dilation[0] * ow)  # (kh,)
        rows = top.unsqueeze(-1) + ky  # (nt, N, M, kh)
        # flat destination row of every slot in the (N*np [+1 empty], cout) output
        dest = (nn_ * np_ + idx).expand(nt, n, m)  # (nt, N, M)
        if has_empty:
            dest = torch.where(idx == np_, n * np_, dest)
        mk = None if mask is None else mask[p].view(nt, b, m, kh * kw, 1)  # image_pad region mask

        u = _row_unfold(x, kw, stride, padding, dilation, ow)  # (N*Hp*ow, kw*C)
        wm = weight.permute(0, 1, 3, 4, 2).reshape(nt, cout, k)  # (nt, cout, k) in (kh, kw, C) order
        out = (x.new_empty if covered else x.new_zeros)(rows_total(n, np_, has_empty), cout)
        for n0, n1, cols in _patch_chunks(u, rows, mk, k):  # cols (nt, nc*M, k)
            if bias is not None:
                y = torch.baddbmm(bias.unsqueeze(1), cols, wm.transpose(1, 2))  # (nt, nc*M, cout)
            else:
                y = torch.bmm(cols, wm.transpose(1, 2))  # (nt, nc*M, cout)
            out.index_copy_(0, dest[:, n0:n1].reshape(-1), y.view(-1, cout))
        out = out[: n * np_].view(n, oh, ow, cout).permute(0, 3, 1, 2)  # (N, cout, oh, ow) NHWC memory

        # the weight gradient reads the patches again: keep the row-unfolded input (kw x the
        # input) rather than the (N*np, k) patch matrix (kh*kw x the input)
        ctx.save_for_backward(u if weight.requires_grad else None, wm, p, dest, rows, mask)
        ctx.x_shape = x.shape
        ctx.meta = (stride, padding, dilation, out_size, has_empty, covered, bias is not None)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, wm, p, dest, rows, mask = ctx.saved_tensors
        stride, padding, dilation, out_size, has_empty, covered, has_bias = ctx.meta
        n, c, h, w = x_shape = ctx.x_shape
        nt, cout, k = wm.shape
        kh = rows.shape[-1]
        kw = k // (kh * c)
        oh, ow = out_size
        np_ = oh * ow
        b, m = p.shape[1:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mk = None if mask is None else mask[p].view(nt, b, m, kh * kw, 1)

        # output gradient of every slot in tile-major order (empty slots read a zero row)
        gflat = grad_out.permute(0, 2, 3, 1).reshape(n * np_, cout)  # (N*np, cout)
        if has_empty:
            gflat = torch.cat([gflat, gflat.new_zeros(1, cout)])

        grad_x = grad_w = grad_b = None
        gw = wm.new_zeros(nt, cout, k) if need_w else None
        gb = wm.new_zeros(nt, cout) if need_b and has_bias else None
        gu = None
        if need_x:
            gu = wm.new_zeros(n * (h + 2 * padding[0]) * ow, kw * c)  # (N*Hp*ow, kw*C)
        if gw is not None or gb is not None or gu is not None:
            for n0, n1, cols in _patch_chunks(u, rows, mk, k):
                g = gflat.index_select(0, dest[:, n0:n1].reshape(-1)).view(nt, -1, cout)  # (nt, nc*M, cout)
                if gw is not None:
                    gw.baddbmm_(g.transpose(1, 2), cols)  # (nt, cout, k)
                if gb is not None:
                    gb += g.sum(1)
                if gu is not None:
                    gc = torch.bmm(g, wm)  # (nt, nc*M, k)
                    if mk is not None:
                        mc = mk if b == 1 else mk[:, n0:n1]
                        gc = (gc.view(nt, -1, m, kh * kw, c) * mc).view(nt, -1, k)
                    gu.index_add_(0, rows[:, n0:n1].reshape(-1), gc.view(-1, kw * c))
        if gw is not None:
            grad_w = gw.view(nt, cout, kh, kw, c).permute(0, 1, 4, 2, 3).contiguous()
        grad_b = gb
        if gu is not None:
            grad_x = _row_fold(gu, x_shape, kw, stride, padding, dilation, ow)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


# CPU: gather the patch matrix in chunks of images small enough to stay in cache and to be
# reused (a large buffer is page-faulted in anew on every allocation)
CPU_CHUNK_BYTES = 4 * 2**20


def _patch_chunks(u: Tensor | None, rows: Tensor, mk: Tensor | None, k: int):
    """Yield ``(n0, n1, cols)`` over chunks of images, ``cols`` the ``(nt, nc*M, k)`` patch
    matrix of images ``n0:n1`` gathered from the row-unfolded input ``u`` (``None`` if no ``u``)."""
    nt, n, m, kh = rows.shape
    per_image = nt * m * k * (u.element_size() if u is not None else 4)
    step = n if rows.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // per_image)
    buf = None
    for n0 in range(0, n, step):  # chunks of images, not patches
        n1 = min(n, n0 + step)
        if u is None:
            yield n0, n1, None
            continue
        r = rows[:, n0:n1].reshape(-1)  # (nt*nc*M*kh,)
        if buf is None:
            buf = u.new_empty(r.numel(), u.shape[1])
        cols = torch.index_select(u, 0, r, out=buf[: r.numel()]).view(nt, -1, k)  # (nt, nc*M, k)
        if mk is not None:
            mc = mk if mk.shape[1] == 1 else mk[:, n0:n1]
            cols = (cols.view(nt, n1 - n0, m, mc.shape[3], -1) * mc).view(nt, -1, k)
        yield n0, n1, cols


def tiled_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _size2 = 1,
    padding: _size2 = 0,
    dilation: _size2 = 1,
    scheme: str = "random",
    tiles: int | None = None,
    training: bool = True,
    generator: torch.Generator | None = None,
    fixed_seed: int | None = None,
    index: Tensor | None = None,
) -> Tensor:
    """RAPA convolution of ``x`` (N, C, H, W) with ``weight`` (nt, cout, C, kh, kw).

    ``bias`` is (nt, cout). Every output pixel is computed by one tile, chosen by
    ``scheme`` (SPEC §1). ``tiles`` defaults to ``weight.shape[0]`` (for ``perforated``
    it is the perforation factor). A precomputed gather ``index`` (B, nt, M) from
    :mod:`rapa.schemes` overrides the scheme's draw.
    """
    nk = weight.shape[0]
    nt = nk if tiles is None else tiles
    schemes.check_scheme(scheme, nt)
    if nk != schemes.num_kernels(scheme, nt):
        raise ValueError(f"weight.shape[0]={nk} does not match scheme={scheme!r} with tiles={nt}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    oh, ow = check_input(x, weight.shape[2], (kh, kw), stride, padding, dilation, nt)
    if index is None:
        index = schemes.assignment_index(scheme, nt, x.shape[0], oh, ow, training, generator,
                                         x.device, fixed_seed)
    if index is None:  # one kernel for every pixel: an ordinary convolution
        return F.conv2d(x, weight[0], None if bias is None else bias[0], stride, padding, dilation)
    mask = None
    if scheme == "image_pad":
        mask = schemes.region_mask(nt, x.shape[2], x.shape[3], oh, ow, (kh, kw), stride, padding,
                                   dilation, x.device).to(x.dtype)
    covered = scheme != "perforated"  # every other scheme's index is a partition of the pixels
    return _TiledConv2dFn.apply(x, weight, bias, index, mask, stride, padding, dilation, (oh, ow),
                                covered)


def check_input(x: Tensor, in_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], nt: int) -> tuple[int, int]:
    """Validate an input batch for a tiled conv; return the output grid ``(oh, ow)``."""
    if x.dim() != 4:
        raise ValueError(f"input of shape {tuple(x.shape)}: expected a 4-D batch (N, C, H, W)")
    if x.shape[1] != in_channels:
        raise ValueError(f"input has {x.shape[1]} channels (shape {tuple(x.shape)}); "
                         f"the layer expects in_channels={in_channels}")
    kh, kw = kernel_size
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    h, w = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    if h < eh or w < ew:
        raise ValueError(f"input of size {tuple(x.shape[2:])} (padded {h}x{w}) is smaller than "
                         f"the kernel ({eh}x{ew} with dilation)")
    oh, ow = conv_output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    if nt > oh * ow:
        raise ValueError(f"tiles={nt} is more than the {oh * ow} output pixels ({oh}x{ow}) of an "
                         f"input of size {tuple(x.shape[2:])}")
    return oh, ow


def tiled_conv2d_dense(x: Tensor, weight: Tensor, bias: Tensor | None, tile_map: Tensor,
                       stride: _size2 = 1, padding: _size2 = 0, dilation: _size2 = 1) -> Tensor:
    """The naive method: convolve with all ``nt`` kernels, then pick each pixel's tile.

    ``nt`` times the MACs of a convolution; a reference and the benchmark's baseline.
    ``tile_map`` (B, np) holds each pixel's tile (-1: output 0).
    """
    nt, cout = weight.shape[:2]
    n = x.shape[0]
    y = F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(), stride,
                 padding, dilation)  # (N, nt*cout, oh, ow)
    oh, ow = y.shape[-2:]
    y = y.view(n, nt, cout, oh * ow)
    sel = tile_map.clamp(min=0).view(-1, 1, 1, oh * ow).expand(n, 1, cout, oh * ow)
    out = y.gather(1, sel).view(n, cout, oh, ow)  # (N, cout, oh, ow)
    return out * (tile_map >= 0).view(-1, 1, oh, ow).to(out.dtype)
