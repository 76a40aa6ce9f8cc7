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


class _TiledConv2dFn(torch.autograd.Function):
    """Autograd function of the gather-matmul-scatter RAPA convolution."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
                mask: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], out_size: tuple[int, int], covered: bool) -> Tensor:
        n, c, h, w = x.shape
        nt, cout = weight.shape[:2]
        kh, kw = weight.shape[-2:]
        k = c * kh * kw
        oh, ow = out_size
        np_ = oh * ow
        b, _, m = index.shape  # index (B, nt, M), B in {1, N}; value np = empty slot
        idx = index.transpose(0, 1).contiguous()  # (nt, B, M); the gather follows its layout
        # a partition lists every pixel once, so it has empty slots iff nt*M != np
        has_empty = nt * m != np_ if covered else bool((idx == np_).any())
        p = idx.clamp(max=np_ - 1)  # (nt, B, M) pixel read (empty slots read pixel np-1)
        iy, ix = p // ow, p % ow
        nn_ = torch.arange(n, device=x.device).view(1, n, 1)  # (1, N, 1)

        xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
        s_n, s_c, s_h, s_w = xp.stride()
        patches = xp.as_strided(  # (N, oh, ow, C, kh, kw) view, no copy
            (n, oh, ow, c, kh, kw),
            (s_n, s_h * stride[0], s_w * stride[1], s_c, s_h * dilation[0], s_w * dilation[1]),
        )
        cols = patches[nn_, iy, ix]  # (nt, N, M, C, kh, kw): every patch gathered once
        if mask is not None:
            mk = mask[p].view(nt, b, m, 1, kh, kw)  # image_pad: zero reads outside the region
            cols = cols * mk
        cols = cols.reshape(nt, n * m, k)  # (nt, N*M, k), a view unless x is channels-last
        wm = weight.view(nt, cout, k)  # (nt, cout, k)
        if bias is not None:
            y = torch.baddbmm(bias.unsqueeze(1), cols, wm.transpose(1, 2))  # (nt, N*M, cout)
        else:
            y = torch.bmm(cols, wm.transpose(1, 2))  # (nt, N*M, cout)

        # flat destination row of every slot in the (N*np [+1 empty], cout) output
        dest = (nn_ * np_ + idx).reshape(-1)  # (nt*N*M,)
        if has_empty:
            dest = torch.where((idx == np_).expand(nt, n, m).reshape(-1), n * np_, dest)
        rows = n * np_ + (1 if has_empty else 0)
        out = (y.new_empty if covered else y.new_zeros)(rows, cout)
        out.index_copy_(0, dest, y.view(-1, cout))
        out = out[: n * np_].view(n, oh, ow, cout).permute(0, 3, 1, 2)  # (N, cout, oh, ow) NHWC memory

        ctx.save_for_backward(cols if weight.requires_grad else None, weight, p, dest, mask)
        ctx.meta = (x.shape, stride, padding, dilation, out_size, has_empty, covered, b, bias is not None)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cols, weight, p, dest, mask = ctx.saved_tensors
        x_shape, stride, padding, dilation, out_size, has_empty, covered, b, has_bias = ctx.meta
        n, c, h, w = x_shape
        nt, cout, _, kh, kw = weight.shape
        k = c * kh * kw
        oh, ow = out_size
        np_ = oh * ow
        m = p.shape[2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        # gather the output gradient of every slot in tile-major order (empty slots read 0)
        gflat = grad_out.permute(0, 2, 3, 1).reshape(n * np_, cout)  # (N*np, cout)
        if has_empty:
            gflat = torch.cat([gflat, gflat.new_zeros(1, cout)])
        g = gflat.index_select(0, dest).view(nt, n * m, cout)  # (nt, N*M, cout)

        grad_x = grad_w = grad_b = None
        if need_w:
            grad_w = torch.bmm(g.transpose(1, 2), cols).view_as(weight)  # (nt, cout, k)
        if need_b and has_bias:
            grad_b = g.sum(1)  # (nt, cout)
        if need_x:
            gc = torch.bmm(g, weight.view(nt, cout, k))  # (nt, N*M, k)
            if mask is not None:
                gc = (gc.view(nt, n, m, c, kh * kw) * mask[p].view(nt, b, m, 1, kh * kw)).view(nt, n * m, k)
            rows = n * np_ + (1 if has_empty else 0)
            buf = (gc.new_empty if covered else gc.new_zeros)(rows, k)
            buf.index_copy_(0, dest, gc.view(-1, k))
            buf = buf[: n * np_].view(n, np_, k).transpose(1, 2)  # (N, k, np)
            grad_x = F.fold(buf, (h, w), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


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
