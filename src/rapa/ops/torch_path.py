"""The PyTorch path of the tiled convolution: every case the native kernels do not take.

:class:`TiledConv2dFn` gathers every patch straight into tile-major order ``(nt, N*M, k)``
from an overlapping view of the padded channels-last input (the plan of
:mod:`rapa.ops.patches`), runs one batched matmul over the tiles, and gathers the outputs back
into pixel order. The backward gathers the patches again (nothing patch-sized is kept), and
gathers the input gradient back the same way; it skips the input gradient when the input does
not need it. MAC count equals ``F.conv2d``'s. On CPU the work goes in cache-sized chunks of
images with per-thread scratch buffers (:mod:`rapa.ops.workspace`). Grouped layers with many
groups take :func:`grouped_tiled_conv2d`, depthwise ones :func:`depthwise_tiled_conv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rapa import schemes
from rapa.ops.geometry import ConvGeometry
from rapa.ops.patches import PatchPlan, gather_source, pad_nhwc, window_table
from rapa.ops.workspace import scratch

CPU_CHUNK_BYTES = 4 * 2**20
"""CPU: work on chunks of images whose patch matrix is about this size (stays in cache), with
scratch buffers that are reused; other devices: one chunk."""


def chunk_size(n: int, per_image_bytes: int, device: torch.device) -> int:
    """Images processed together: all of them off the CPU, a cache-sized chunk on it."""
    return n if device.type != "cpu" else max(1, min(n, CPU_CHUNK_BYTES // max(per_image_bytes, 1)))


class TiledConv2dFn(torch.autograd.Function):
    """Autograd function of the gather-matmul-gather RAPA convolution.

    Patch entries are ordered ``(kh, kw, C)`` so that a patch is ``kh`` rows of ``kw*C``
    contiguous numbers of the padded channels-last input, gathered with one
    ``index_select`` (a memcpy per row). Slots are processed in chunks of images, tile-major
    inside a chunk: one batched matmul per chunk, then the chunk's output pixels are
    gathered in order from its slots. Nothing of patch size is kept for the backward: it
    gathers the patches again; the input gradient is gathered back to pixel order the same
    way (each covered pixel has exactly one slot) and summed over the kernel window.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
                mask: Tensor | None, geo: ConvGeometry, covered: bool) -> Tensor:
        stride, padding, dilation, out_size = geo.stride, geo.padding, geo.dilation, geo.out_size
        n, c, h, w = x.shape
        nt, cout, _, kh, kw = weight.shape
        k = c * kh * kw
        oh, ow = out_size
        np_ = oh * ow
        m = index.shape[2]  # index (B, nt, M), B in {1, N}; value np = empty slot
        step = chunk_size(n, nt * m * k * x.element_size(), x.device)
        xp = pad_nhwc(x, padding)  # (N, Hp, Wp, C) scratch
        src, strided = gather_source(xp, kw, stride, dilation, ow)
        plan = PatchPlan(index, n, xp.shape[1:3], out_size, kh, stride, dilation, step, covered, strided)
        mk = None if mask is None else mask[plan.p].unsqueeze(-1)  # (L, kh*kw, 1) image_pad mask

        wt = weight.permute(0, 3, 4, 2, 1).reshape(nt, k, cout)  # (nt, k, cout), k in (kh, kw, C) order
        length = n * nt * m
        # every output pixel's slot within its chunk (an uncovered pixel: the chunk's zero row)
        inv = plan.dest.new_empty(n * np_ + 1) if covered else plan.dest.new_full((n * np_ + 1,), -1)
        inv.scatter_(0, plan.dest, scratch.arange(length, x.device))
        def chunk_slots() -> tuple[Tensor, Tensor]:
            n0s = torch.arange(n, device=x.device).div(step, rounding_mode="floor") * step
            clen = (n - n0s).clamp_(max=step) * (nt * m)  # slots of the image's chunk
            return (n0s * (nt * m)).unsqueeze(1), clen.unsqueeze(1)  # (N, 1) each

        sbase, clen = scratch.memo(("chunk_slots", n, step, nt * m, x.device), chunk_slots)
        local = inv[: n * np_].view(n, np_) - sbase  # (N, np)
        if not covered:
            local = torch.where(local < 0, clen, local)
        out = x.new_empty(n * np_, cout)  # (N*np, cout) pixel order
        sizes = [min(step, n - n0) for n0 in range(0, n, step)]  # images per chunk
        slots = [nc * nt * m for nc in sizes]
        rows_c = plan.rows.split([sl * kh for sl in slots])
        local_c = local.view(-1).split([nc * np_ for nc in sizes])
        out_c = out.split([nc * np_ for nc in sizes])
        mk_c = None if mk is None else mk.split(slots)
        buf = scratch.get("cols", step * nt * m * k, x).view(-1, kw * c)
        y = scratch.get("y", (step * nt * m + 1) * cout, x).view(-1, cout)  # a chunk's slots + a zero row
        b3 = None if bias is None else bias.unsqueeze(1)  # (nt, 1, cout)
        views: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for q, sl in enumerate(slots):
            if sl not in views:  # at most two sizes: full chunks, then the last one
                if not covered:
                    y[sl].zero_()  # the uncovered pixels' row
                views[sl] = (buf[: sl * kh], buf[: sl * kh].view(nt, -1, k), y[: sl + 1],
                             y[:sl].view(nt, -1, cout))
            cols2, cols, ys, yc = views[sl]  # (sl*kh, kw*C), (nt, nc*M, k), (sl+1, cout), (nt, nc*M, cout)
            torch.index_select(src, 0, rows_c[q], out=cols2)
            if mk_c is not None:  # image_pad: zero the reads outside the pixel's region
                cols = (cols.view(sl, kh * kw, c) * mk_c[q]).view(nt, -1, k)
            if b3 is not None:
                torch.baddbmm(b3, cols, wt, out=yc)
            else:
                torch.bmm(cols, wt, out=yc)
            # the chunk's output pixels, in order, gathered from its slots (in cache)
            torch.index_select(ys, 0, local_c[q], out=out_c[q])
        out = out.view(n, oh, ow, cout).permute(0, 3, 1, 2)  # (N, cout, oh, ow) NHWC memory

        # for the input gradient: the slot map with a last column pointing at the zero row
        # (in units of patch pieces: kh*kw pieces of C numbers per slot)
        ext = torch.cat([local, clen], 1).mul_(kh * kw) if ctx.needs_input_grad[0] else None  # (N, np+1)
        ctx.save_for_backward(x, wt, plan.rows, plan.dest, ext, mk)
        ctx.meta = (stride, padding, dilation, out_size, plan.has_empty, bias is not None, step, sizes,
                    kh, kw, covered)
        if x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1:
            return out  # the input is channels-last (also when C == 1): so is the output
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, wt, rows, dest, ext, mk = ctx.saved_tensors
        stride, padding, dilation, out_size, has_empty, has_bias, step, sizes, kh, kw, covered = ctx.meta
        n, c, h, w = x.shape
        nt, k, cout = wt.shape
        oh, ow = out_size
        np_ = oh * ow
        m = dest.shape[0] // (n * nt)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        gflat = grad_out.permute(0, 2, 3, 1).reshape(n * np_, cout)  # (N*np, cout)
        if has_empty:  # empty slots read a zero row
            gflat = torch.cat([gflat, gflat.new_zeros(1, cout)])
        gw = gx = src = table = None
        if need_w:
            gw = wt.new_zeros(nt, k, cout)  # the weight gradient, transposed like wt
            src, _ = gather_source(pad_nhwc(x, padding), kw, stride, dilation, ow)
        if need_x:
            gx = x.new_empty(n, h, w, c)  # (N, H, W, C)
            # for every input pixel of a chunk and kernel offset: the patch piece that reads it
            # (as an entry of ext) and the piece's offset in its patch
            def window() -> tuple[Tensor, Tensor]:
                table = window_table((h, w), out_size, (kh, kw), stride, padding, dilation, x.device)
                img = torch.arange(step, device=x.device).view(step, 1) * (np_ + 1)
                koff = torch.arange(kh * kw, device=x.device).repeat(step * h * w)
                return (img + table).view(-1), koff  # (step*H*W*kh*kw,) each

            table, koff = scratch.memo(("window", step, (h, w), out_size, (kh, kw), stride, padding,
                                           dilation, x.device), window)
        slots = [nc * nt * m for nc in sizes]  # sizes: images per chunk, as in the forward
        dest_c = dest.split(slots)
        rows_c = rows.split([sl * kh for sl in slots])
        mk_c = None if mk is None else mk.split(slots)
        gbp = wt.new_empty(len(sizes), nt, cout) if need_b and has_bias else None  # per chunk
        gmax = step * nt * m
        gbuf = scratch.get("g", gmax * cout, gflat)
        if gw is not None:
            cbuf = scratch.get("cols", gmax * k, x).view(-1, kw * c)
        if gx is not None:
            ext_c = ext.view(-1).split([nc * (np_ + 1) for nc in sizes])
            gx_c = gx.view(-1, c).split([nc * h * w for nc in sizes])
            gcbuf = scratch.get("gc", (gmax + 1) * k, wt).view(-1, k)  # a chunk's slots + a zero row
            emax = step * h * w * kh * kw
            jbuf = scratch.get("j", emax, table)
            pbuf = scratch.get("gn", emax * c, wt).view(-1, c)
            wm = wt.transpose(1, 2)  # (nt, cout, k)
        views: dict[int, tuple] = {}
        for q, (nc, sl) in enumerate(zip(sizes, slots)):
            if sl not in views:  # at most two sizes: full chunks, then the last one
                g2 = gbuf[: sl * cout].view(sl, cout)
                g3 = g2.view(nt, -1, cout)  # (nt, nc*M, cout)
                v = [g2, g3]
                if gw is not None:
                    v += [cbuf[: sl * kh], cbuf[: sl * kh].view(nt, -1, k)]
                if gx is not None:
                    gcbuf[sl].zero_()  # the zero row that absent pieces read
                    e = nc * h * w * kh * kw
                    v += [gcbuf[:sl].view(nt, -1, k), gcbuf[: sl + 1].view(-1, c), jbuf[:e], table[:e],
                          koff[:e], pbuf[:e], pbuf[:e].view(-1, kh * kw, c)]
                views[sl] = tuple(v)
            g2, g3 = views[sl][:2]
            torch.index_select(gflat, 0, dest_c[q], out=g2)  # output gradient of every slot
            if gw is not None:
                cols2, cols = views[sl][2:4]
                torch.index_select(src, 0, rows_c[q], out=cols2)
                if mk_c is not None:
                    cols = (cols.view(sl, kh * kw, c) * mk_c[q]).view(nt, -1, k)
                gw.baddbmm_(cols.transpose(1, 2), g3)  # (nt, k, cout)
            if gbp is not None:
                torch.sum(g3, 1, out=gbp[q])
            if gx is not None:
                gc, pieces_src, j, tab, ko, pieces2, pieces3 = views[sl][-7:]
                torch.bmm(g3, wm, out=gc)  # (nt, nc*M, k) patch gradients
                if mk_c is not None:  # in place: gathered below
                    gc.view(sl, kh * kw, c).mul_(mk_c[q])
                # every input pixel sums the kh*kw pieces of patch gradient that read it: one
                # gather of C-sized pieces (absent ones read the zero row), one sum
                torch.index_select(ext_c[q], 0, tab, out=j).add_(ko)
                torch.index_select(pieces_src, 0, j, out=pieces2)
                torch.sum(pieces3, 1, out=gx_c[q])
        gb = None if gbp is None else gbp.sum(0)
        grad_w = None if gw is None else gw.view(nt, kh, kw, c, cout).permute(0, 4, 3, 1, 2).contiguous()
        grad_x = None if gx is None else gx.permute(0, 3, 1, 2)  # (N, C, H, W) channels-last memory
        return grad_x, grad_w, gb, None, None, None, None



def grouped_tiled_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
                         mask: Tensor | None, geo: ConvGeometry, groups: int) -> Tensor:
    """The PyTorch path of a grouped tiled convolution (autograd differentiates it).

    ``x`` (N, C, H, W), ``weight`` (nt, cout, C/groups, kh, kw), ``index`` (B, nt, M) with
    value ``np`` for an empty slot, ``mask`` (np, kh*kw) or ``None``. The patches are
    unfolded, gathered into slot order with an extra zero patch for empty slots, multiplied
    by each (tile, group) kernel matrix in one batched matmul and scattered back to pixel
    order (pixels no slot lists stay 0).
    """
    stride, padding, dilation, out_size = geo.stride, geo.padding, geo.dilation, geo.out_size
    n, c = x.shape[:2]
    nt, cout, cg, kh, kw = weight.shape
    kk, og = kh * kw, cout // groups
    kg = cg * kk
    oh, ow = out_size
    np_, m = oh * ow, index.shape[2]
    cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # (N, C*kh*kw, np), (C, kh, kw) order
    if mask is not None:  # image_pad: zero the reads outside the pixel's own region
        cols = (cols.view(n, c, kk, np_) * mask.t().view(1, 1, kk, np_)).view(n, c * kk, np_)
    cols = F.pad(cols, (0, 1))  # (N, C*kk, np+1): a zero patch that empty slots read
    idx = index.expand(n, nt, m).reshape(n, 1, nt * m)  # (N, 1, nt*M), values in [0, np]
    sel = cols.gather(2, idx.expand(n, c * kk, nt * m))  # (N, C*kk, nt*M)
    sel = sel.view(n, groups, kg, nt, m).permute(3, 1, 0, 4, 2).reshape(nt * groups, n * m, kg)
    wm = weight.reshape(nt, groups, og, kg).transpose(2, 3).reshape(nt * groups, kg, og)
    y = torch.bmm(sel, wm).view(nt, groups, n, m, og)  # (nt, G, N, M, og)
    if bias is not None:
        y = y + bias.view(nt, groups, 1, 1, og)
    y = y.permute(2, 1, 4, 0, 3).reshape(n, cout, nt * m)  # (N, cout, nt*M), channel = g*og + o
    out = y.new_zeros(n, cout, np_ + 1).scatter(2, idx.expand(n, cout, nt * m), y)
    return out[:, :, :np_].reshape(n, cout, oh, ow)


def depthwise_tiled_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
                           mask: Tensor | None, geo: ConvGeometry, covered: bool = True) -> Tensor:
    """The PyTorch path of a tiled convolution with one input channel per group (depthwise,
    ``groups == C``; ``cout = m * C`` with a channel multiplier ``m``); autograd differentiates it.

    A sum over the ``kh*kw`` kernel offsets of the input shifted by the offset (a strided view
    of the padded input) times every pixel's own weight, gathered from its tile: only
    output-sized tensors, no patch matrix. ``mask`` (np, kh*kw) zeroes reads (``image_pad``);
    pixels no slot lists (``covered=False``) are 0.
    """
    stride, padding, dilation, out_size = geo.stride, geo.padding, geo.dilation, geo.out_size
    n, c = x.shape[:2]
    nt, cout, _, kh, kw = weight.shape
    oh, ow = out_size
    (sh, sw), (dh, dw) = stride, dilation
    tmap = schemes.index_to_tile_map(index, oh * ow)  # (B, np), -1: no slot
    t = tmap.clamp(min=0)
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    if cout != c:  # output channel o reads input channel o // m
        xp = xp.repeat_interleave(cout // c, 1)
    # every pixel's weights and bias, picked from its tile by a one-hot matmul (whose backward,
    # the per-tile sums of the weight gradient, is a matmul too, not a scatter-add)
    onehot = F.one_hot(t, nt).to(x.dtype)  # (B, np, nt)

    def per_pixel(v: Tensor) -> Tensor:  # (nt, cout) -> (B, cout, oh, ow)
        return (onehot @ v).transpose(1, 2).reshape(-1, cout, oh, ow)

    wq = weight.reshape(nt, cout, kh * kw)
    out = None
    for q in range(kh * kw):  # a loop over the kernel offsets, each a whole-tensor operation
        ky, kx = divmod(q, kw)
        xs = xp[:, :, ky * dh: ky * dh + sh * (oh - 1) + 1: sh, kx * dw: kx * dw + sw * (ow - 1) + 1: sw]
        w = per_pixel(wq[:, :, q])
        if mask is not None:
            w = w * mask[:, q].view(1, 1, oh, ow)
        out = xs * w if out is None else out + xs * w
    assert out is not None
    if bias is not None:
        out = out + per_pixel(bias)
    if not covered:
        out = out * (tmap >= 0).view(-1, 1, oh, ow).to(out.dtype)
    return out

