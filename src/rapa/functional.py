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


def channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last memory, marked as such also when ``C == 1`` (stride of C is 1),
    so that :func:`tiled_conv2d` returns channels-last outputs for it."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1:  # a view with the channel stride set to 1
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x


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
    """Adjoint of :func:`_row_unfold`: sum row gradients back onto the input, ``(N, H, W, C)``."""
    n, c, h, w = x_shape
    ph, pw = padding
    hp, wp = h + 2 * ph, w + 2 * pw
    gu = gu.view(n, hp, ow, kw, c)
    gxp = gu.new_zeros(n, hp, wp, c)  # (N, Hp, Wp, C)
    span = (ow - 1) * stride[1] + 1
    for kx in range(kw):  # kernel columns, not patches
        x0 = kx * dilation[1]
        gxp[:, :, x0:x0 + span:stride[1]] += gu[:, :, :, kx]
    return gxp[:, ph:ph + h, pw:pw + w]  # (N, H, W, C)


# CPU: work on chunks of images whose patch matrix stays in cache and whose buffers are
# reused (a large buffer is page-faulted in anew on every allocation); other devices: one chunk
CPU_CHUNK_BYTES = 4 * 2**20


def _image_chunks(n: int, per_image_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    """``(n0, n1)`` ranges of images processed together."""
    step = n if device.type != "cpu" else max(1, CPU_CHUNK_BYTES // max(per_image_bytes, 1))
    return [(n0, min(n, n0 + step)) for n0 in range(0, n, step)]


class _Patches:
    """Gathers the tile-major patch matrix ``(nt, nc*M, k)`` of a chunk of images.

    ``rloc`` (nt, B, M, kh) is, for every slot and kernel row, the row of one image's
    row-unfolded input that the patch reads; a chunk offsets it by image.
    """

    def __init__(self, rloc: Tensor, mk: Tensor | None, k: int, kw: int, stride, padding, dilation,
                 ow: int, hp: int):
        self.rloc, self.mk, self.k, self.kw = rloc, mk, k, kw
        self.geom = (stride, padding, dilation, ow)
        self.rows_per_image = hp * ow
        self.buf: Tensor | None = None

    def rows(self, n0: int, n1: int) -> Tensor:
        """Rows ``(nt*nc*M*kh,)`` of the chunk's row-unfolded input read by its slots."""
        rl = self.rloc if self.rloc.shape[1] == 1 else self.rloc[:, n0:n1]
        off = torch.arange(n1 - n0, device=rl.device).view(1, -1, 1, 1) * self.rows_per_image
        return (rl + off).reshape(-1)  # (nt*nc*M*kh,)

    def gather(self, xc: Tensor, n0: int, n1: int, r: Tensor) -> Tensor:
        """Patch matrix ``(nt, nc*M, k)`` of images ``xc = x[n0:n1]`` (a reused buffer)."""
        stride, padding, dilation, ow = self.geom
        u = _row_unfold(xc, self.kw, stride, padding, dilation, ow)  # (nc*Hp*ow, kw*C)
        if self.buf is None or self.buf.shape[0] < r.numel():
            self.buf = u.new_empty(r.numel(), u.shape[1])
        nt = self.rloc.shape[0]
        cols = torch.index_select(u, 0, r, out=self.buf[: r.numel()]).view(nt, -1, self.k)
        if self.mk is not None:  # image_pad: zero the reads outside the pixel's region
            mc = self.mk if self.mk.shape[1] == 1 else self.mk[:, n0:n1]
            cols = (cols.view(nt, n1 - n0, -1, mc.shape[3], u.shape[1] // self.kw) * mc).view(nt, -1, self.k)
        return cols


class _TiledConv2dFn(torch.autograd.Function):
    """Autograd function of the gather-matmul-scatter RAPA convolution.

    Patch entries are ordered ``(kh, kw, C)`` so that a patch is ``kh`` contiguous rows of
    a row-unfolded channels-last input, gathered with one ``index_select`` (a memcpy per
    row). Nothing of patch size is kept for the backward: it gathers the patches again.
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
        b, _, m = index.shape  # index (B, nt, M), B in {1, N}; value np = empty slot
        idx = index.transpose(0, 1).contiguous()  # (nt, B, M)
        # a partition lists every pixel once, so it has empty slots iff nt*M != np
        has_empty = nt * m != np_ if covered else bool((idx == np_).any())
        p = idx.clamp(max=np_ - 1)  # (nt, B, M) pixel read (empty slots read pixel np-1)
        ky = torch.arange(kh, device=x.device) * (dilation[0] * ow)  # (kh,)
        rloc = (((p // ow) * stride[0]) * ow + p % ow).unsqueeze(-1) + ky  # (nt, B, M, kh)
        # flat destination row of every slot in the (N*np [+1 empty], cout) output
        nn_ = torch.arange(n, device=x.device).view(1, n, 1)  # (1, N, 1)
        dest = (nn_ * np_ + idx).expand(nt, n, m)  # (nt, N, M)
        if has_empty:
            dest = torch.where(idx == np_, n * np_, dest)
        mk = None if mask is None else mask[p].view(nt, b, m, kh * kw, 1)  # image_pad region mask
        patches = _Patches(rloc, mk, k, kw, stride, padding, dilation, ow, h + 2 * padding[0])

        wm = weight.permute(0, 1, 3, 4, 2).reshape(nt, cout, k)  # (nt, cout, k) in (kh, kw, C) order
        out = (x.new_empty if covered else x.new_zeros)(rows_total(n, np_, has_empty), cout)
        for n0, n1 in _image_chunks(n, nt * m * k * x.element_size(), x.device):
            cols = patches.gather(x[n0:n1], n0, n1, patches.rows(n0, n1))  # (nt, nc*M, k)
            if bias is not None:
                y = torch.baddbmm(bias.unsqueeze(1), cols, wm.transpose(1, 2))  # (nt, nc*M, cout)
            else:
                y = torch.bmm(cols, wm.transpose(1, 2))  # (nt, nc*M, cout)
            out.index_copy_(0, dest[:, n0:n1].reshape(-1), y.view(-1, cout))
        out = out[: n * np_].view(n, oh, ow, cout).permute(0, 3, 1, 2)  # (N, cout, oh, ow) NHWC memory

        ctx.save_for_backward(x, wm, dest, rloc, mk)
        ctx.meta = (stride, padding, dilation, out_size, has_empty, bias is not None)
        if x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1:
            return out  # the input is channels-last (also when C == 1): so is the output
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, wm, dest, rloc, mk = ctx.saved_tensors
        stride, padding, dilation, out_size, has_empty, has_bias = ctx.meta
        n, c, h, w = x.shape
        nt, cout, k = wm.shape
        kh = rloc.shape[-1]
        kw = k // (kh * c)
        oh, ow = out_size
        np_ = oh * ow
        m = rloc.shape[2]
        hp = h + 2 * padding[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        patches = _Patches(rloc, mk, k, kw, stride, padding, dilation, ow, hp)

        # output gradient of every slot in tile-major order (empty slots read a zero row)
        gflat = grad_out.permute(0, 2, 3, 1).reshape(n * np_, cout)  # (N*np, cout)
        if has_empty:
            gflat = torch.cat([gflat, gflat.new_zeros(1, cout)])
        gw = wm.new_zeros(nt, cout, k) if need_w else None
        gb = wm.new_zeros(nt, cout) if need_b and has_bias else None
        gx = x.new_empty(n, h, w, c) if need_x else None  # (N, H, W, C)
        gc_buf = None
        for n0, n1 in _image_chunks(n, nt * m * k * x.element_size(), x.device):
            g = gflat.index_select(0, dest[:, n0:n1].reshape(-1)).view(nt, -1, cout)  # (nt, nc*M, cout)
            r = patches.rows(n0, n1)
            if gw is not None:
                gw.baddbmm_(g.transpose(1, 2), patches.gather(x[n0:n1], n0, n1, r))  # (nt, cout, k)
            if gb is not None:
                gb += g.sum(1)
            if gx is not None:
                p_c = g.shape[1]
                if gc_buf is None or gc_buf.numel() < nt * p_c * k:
                    gc_buf = wm.new_empty(nt * p_c * k)  # reused: a fresh one is page-faulted in
                gc = torch.bmm(g, wm, out=gc_buf[: nt * p_c * k].view(nt, p_c, k))  # (nt, nc*M, k)
                if mk is not None:
                    mc = mk if mk.shape[1] == 1 else mk[:, n0:n1]
                    gc = (gc.view(nt, n1 - n0, m, kh * kw, c) * mc).view(nt, -1, k)
                gu = gc.new_zeros((n1 - n0) * hp * ow, kw * c)  # (nc*Hp*ow, kw*C)
                gu.index_add_(0, r, gc.view(-1, kw * c))
                gx[n0:n1] = _row_fold(gu, (n1 - n0, c, h, w), kw, stride, padding, dilation, ow)
        grad_w = None if gw is None else gw.view(nt, cout, kh, kw, c).permute(0, 1, 4, 2, 3).contiguous()
        grad_x = None if gx is None else gx.permute(0, 3, 1, 2)  # (N, C, H, W) channels-last memory
        return grad_x, grad_w, gb, None, None, None, None, None, None, None


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
