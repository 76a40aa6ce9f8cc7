"""Functional RAPA convolution: ``np`` patches times one of ``nt`` kernel matrices each.

On the CPU in float32, :func:`tiled_conv2d` runs on the native kernels of :mod:`rapa.native`
where they build; this module holds the PyTorch path that every other case takes. It
gathers every patch straight into tile-major order ``(nt, N*M, k)`` from
an overlapping view of the padded channels-last input, runs one batched matmul over the
tiles, and gathers the outputs back into pixel order. The backward gathers the patches
again (nothing patch-sized is kept), and gathers the input gradient back the same way; it
skips the input gradient when the input does not need it. MAC count equals ``F.conv2d``'s.
On CPU the work goes in cache-sized chunks of images with per-thread scratch buffers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from rapa import native, schemes

_size2 = int | Sequence[int]


def channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last memory, marked as such also when ``C == 1`` (stride of C is 1),
    so that :func:`tiled_conv2d` returns channels-last outputs for it."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1:  # a view with the channel stride set to 1
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x


PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")
"""``nn.Conv2d``'s padding modes; every one is accepted by the tiled convolution."""


def resolve_padding(padding: _size2 | str, kernel_size: _size2, stride: _size2 = 1,
                    dilation: _size2 = 1) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` padding of a convolution, as ``nn.Conv2d`` pads:
    a number or pair pads both sides alike, ``'valid'`` not at all, ``'same'`` (stride 1
    only) by ``dilation*(k-1)`` in total, the odd one at the bottom/right."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding={padding!r}: give a number, a pair, 'same' or 'valid'")
        if any(s != 1 for s in _pair(stride)):
            raise ValueError(f"padding='same' with stride={tuple(_pair(stride))}: nn.Conv2d allows "
                             "'same' only with stride 1; give numeric padding")
        out: list[int] = []
        for d, k in zip(_pair(dilation), _pair(kernel_size)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return (out[0], out[1], out[2], out[3])
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def conv_output_size(h: int, w: int, kernel_size: _size2, stride: _size2 = 1,
                     padding: _size2 | str = 0, dilation: _size2 = 1) -> tuple[int, int]:
    """Output height and width of a convolution, as ``nn.Conv2d`` computes them."""
    (kh, kw), (sh, sw), (dh, dw) = map(_pair, (kernel_size, stride, dilation))
    top, bottom, left, right = resolve_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


def pad_input(x: Tensor, padding: _size2 | str, padding_mode: str, kernel_size: _size2,
              stride: _size2 = 1, dilation: _size2 = 1) -> tuple[Tensor, tuple[int, int]]:
    """``x`` padded as ``nn.Conv2d`` pads it, and the zero padding still to apply on both
    sides ``(ph, pw)``: symmetric zero padding is left to the convolution (no copy); any
    other mode, or an asymmetric ``'same'``, is applied here with ``F.pad``."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
    top, bottom, left, right = resolve_padding(padding, kernel_size, stride, dilation)
    if padding_mode == "zeros" and top == bottom and left == right:
        return x, (top, left)
    if top or bottom or left or right:
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    return x, (0, 0)


# grouped layers with up to this many groups run one ungrouped tiled convolution per group;
# more groups (depthwise layers off the native kernels) take grouped_tiled_conv2d
GROUP_LOOP_MAX = 16

# CPU: work on chunks of images whose patch matrix stays in cache, with scratch buffers that
# are reused; other devices: one chunk
CPU_CHUNK_BYTES = 4 * 2**20
MEMO_SIZE = 64  # shape-dependent index tables kept per thread


class _Workspace(threading.local):
    """Scratch buffers of the CPU chunk loop, kept per thread from call to call.

    A freshly allocated buffer of a few MB is page-faulted in on first touch, which costs
    more than the gather or matmul that fills it (measured: 1.1 ms against 0.1 ms for a
    4 MB patch matrix). Buffers only ever hold data inside one call, so reusing them
    across layers and calls is safe; they grow to the largest size seen.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], Tensor] = {}
        self.tables: dict[tuple, Any] = {}

    def get(self, role: str, numel: int, like: Tensor) -> Tensor:
        """A flat scratch tensor of ``numel`` elements of ``like``'s dtype (fresh off the CPU)."""
        if like.device.type != "cpu":
            return like.new_empty(numel)
        key = (role, like.dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[key] = like.new_empty(numel)
        return buf[:numel]

    def arange(self, n: int, device: torch.device) -> Tensor:
        """``torch.arange(n)`` (int64), read-only: cached on the CPU."""
        if device.type != "cpu":
            return torch.arange(n, device=device)
        key = ("arange", torch.int64)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.arange(max(n, 1024))
        return buf[:n]

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, kept for the next call with the same ``key`` (index tables that depend
        on shapes only; read-only). The last :data:`MEMO_SIZE` keys are kept."""
        value = self.tables.pop(key, None)
        if value is None:
            value = make()
            while len(self.tables) >= MEMO_SIZE:
                self.tables.pop(next(iter(self.tables)))
        self.tables[key] = value  # most recent last
        return value

    def clear(self) -> None:
        """Free this thread's buffers and tables."""
        self.bufs.clear()
        self.tables.clear()


_workspace = _Workspace()


def clear_workspace() -> None:
    """Free the calling thread's scratch buffers and index tables of the CPU path, and the
    native kernels' per-thread scratch.

    They are kept between calls for speed and grow to the largest batch seen (the padded
    input of a layer, and about ``CPU_CHUNK_BYTES`` per buffer otherwise)."""
    _workspace.clear()
    native.clear_scratch()


def _chunk_size(n: int, per_image_bytes: int, device: torch.device) -> int:
    """Images processed together: all of them off the CPU, a cache-sized chunk on it."""
    return n if device.type != "cpu" else max(1, min(n, CPU_CHUNK_BYTES // max(per_image_bytes, 1)))


def _chunk_order(a: Tensor, step: int) -> Tensor:
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


class _Plan:
    """Index arithmetic of one tiled convolution, flat in chunk order (:func:`_chunk_order`).

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
        idx_c = _chunk_order(index.expand(n, nt, m), step)  # (L,) pixel of every slot, np = empty
        img_c = _workspace.memo(("img_c", n, nt, m, step, dev), lambda: _chunk_order(
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

        pix, ky = _workspace.memo(("pix", oh, ow, wp, kh, stride, dilation, strided, dev), offsets)
        base = pix.index_select(0, self.p).add_(img_c, alpha=hp * row_len)  # (L,)
        self.rows = (base.unsqueeze(1) + ky).view(-1)  # (L*kh,)
        dest = torch.add(idx_c, img_c, alpha=np_)
        if self.has_empty:
            dest = torch.where(idx_c == np_, n * np_, dest)
        self.dest = dest  # (L,)


def _pad_nhwc(x: Tensor, padding: tuple[int, int]) -> Tensor:
    """Zero-padded channels-last copy of ``x`` (N, C, H, W) in scratch: ``(N, Hp, Wp, C)``."""
    n, c, h, w = x.shape
    ph, pw = padding
    hp, wp = h + 2 * ph, w + 2 * pw
    xp = _workspace.get("xp", n * hp * wp * c, x).view(n, hp, wp, c)  # (N, Hp, Wp, C)
    if ph:
        xp[:, :ph].zero_()
        xp[:, ph + h:].zero_()
    if pw:
        xp[:, ph:ph + h, :pw].zero_()
        xp[:, ph:ph + h, pw + w:].zero_()
    xp[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    return xp


def _gather_source(xp: Tensor, kw: int, stride: tuple[int, int], dilation: tuple[int, int],
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


def _window_table(in_hw: tuple[int, int], out_size: tuple[int, int], kernel_size: tuple[int, int],
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


class _TiledConv2dFn(torch.autograd.Function):
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
                mask: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], out_size: tuple[int, int], covered: bool) -> Tensor:
        n, c, h, w = x.shape
        nt, cout, _, kh, kw = weight.shape
        k = c * kh * kw
        oh, ow = out_size
        np_ = oh * ow
        m = index.shape[2]  # index (B, nt, M), B in {1, N}; value np = empty slot
        step = _chunk_size(n, nt * m * k * x.element_size(), x.device)
        xp = _pad_nhwc(x, padding)  # (N, Hp, Wp, C) scratch
        src, strided = _gather_source(xp, kw, stride, dilation, ow)
        plan = _Plan(index, n, xp.shape[1:3], out_size, kh, stride, dilation, step, covered, strided)
        mk = None if mask is None else mask[plan.p].unsqueeze(-1)  # (L, kh*kw, 1) image_pad mask

        wt = weight.permute(0, 3, 4, 2, 1).reshape(nt, k, cout)  # (nt, k, cout), k in (kh, kw, C) order
        length = n * nt * m
        # every output pixel's slot within its chunk (an uncovered pixel: the chunk's zero row)
        inv = plan.dest.new_empty(n * np_ + 1) if covered else plan.dest.new_full((n * np_ + 1,), -1)
        inv.scatter_(0, plan.dest, _workspace.arange(length, x.device))
        def chunk_slots() -> tuple[Tensor, Tensor]:
            n0s = torch.arange(n, device=x.device).div(step, rounding_mode="floor") * step
            clen = (n - n0s).clamp_(max=step) * (nt * m)  # slots of the image's chunk
            return (n0s * (nt * m)).unsqueeze(1), clen.unsqueeze(1)  # (N, 1) each

        sbase, clen = _workspace.memo(("chunk_slots", n, step, nt * m, x.device), chunk_slots)
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
        buf = _workspace.get("cols", step * nt * m * k, x).view(-1, kw * c)
        y = _workspace.get("y", (step * nt * m + 1) * cout, x).view(-1, cout)  # a chunk's slots + a zero row
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
            src, _ = _gather_source(_pad_nhwc(x, padding), kw, stride, dilation, ow)
        if need_x:
            gx = x.new_empty(n, h, w, c)  # (N, H, W, C)
            # for every input pixel of a chunk and kernel offset: the patch piece that reads it
            # (as an entry of ext) and the piece's offset in its patch
            def window() -> tuple[Tensor, Tensor]:
                table = _window_table((h, w), out_size, (kh, kw), stride, padding, dilation, x.device)
                img = torch.arange(step, device=x.device).view(step, 1) * (np_ + 1)
                koff = torch.arange(kh * kw, device=x.device).repeat(step * h * w)
                return (img + table).view(-1), koff  # (step*H*W*kh*kw,) each

            table, koff = _workspace.memo(("window", step, (h, w), out_size, (kh, kw), stride, padding,
                                           dilation, x.device), window)
        slots = [nc * nt * m for nc in sizes]  # sizes: images per chunk, as in the forward
        dest_c = dest.split(slots)
        rows_c = rows.split([sl * kh for sl in slots])
        mk_c = None if mk is None else mk.split(slots)
        gbp = wt.new_empty(len(sizes), nt, cout) if need_b and has_bias else None  # per chunk
        gmax = step * nt * m
        gbuf = _workspace.get("g", gmax * cout, gflat)
        if gw is not None:
            cbuf = _workspace.get("cols", gmax * k, x).view(-1, kw * c)
        if gx is not None:
            ext_c = ext.view(-1).split([nc * (np_ + 1) for nc in sizes])
            gx_c = gx.view(-1, c).split([nc * h * w for nc in sizes])
            gcbuf = _workspace.get("gc", (gmax + 1) * k, wt).view(-1, k)  # a chunk's slots + a zero row
            emax = step * h * w * kh * kw
            jbuf = _workspace.get("j", emax, table)
            pbuf = _workspace.get("gn", emax * c, wt).view(-1, c)
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
        return grad_x, grad_w, gb, None, None, None, None, None, None, None


def check_dtype_device(x: Tensor, weight: Tensor) -> None:
    """ValueError naming both if the input's dtype or device differs from the weights'."""
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"input of dtype {x.dtype} on {x.device} does not match the layer's weights "
                         f"({weight.dtype} on {weight.device}): convert the input (x.to(weight.dtype)) "
                         f"or the layer (layer.to(...)) so that both agree")


def tiled_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _size2 = 1,
    padding: _size2 | str = 0,
    dilation: _size2 = 1,
    scheme: str = "random",
    tiles: int | None = None,
    training: bool = True,
    generator: torch.Generator | None = None,
    fixed_seed: int | None = None,
    index: Tensor | None = None,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """RAPA convolution of ``x`` (N, C, H, W) or unbatched (C, H, W) with ``weight``
    (nt, cout, C/groups, kh, kw).

    ``bias`` is (nt, cout). Every output pixel is computed by one tile, chosen by
    ``scheme`` (SPEC §1); with ``groups > 1`` a tile is one kernel matrix per group, all
    used for the same pixels. ``tiles`` defaults to ``weight.shape[0]`` (for ``perforated``
    it is the perforation factor). ``padding`` and ``padding_mode`` are ``nn.Conv2d``'s
    (numbers, ``'same'``, ``'valid'``; zeros, reflect, replicate, circular). A precomputed
    gather ``index`` (B, nt, M) from :mod:`rapa.schemes` overrides the scheme's draw. CPU
    float32 calls run on the native kernels of :mod:`rapa.native` where they build
    (ungrouped and depthwise layers); other calls on the PyTorch path. Grouped layers with
    up to :data:`GROUP_LOOP_MAX` groups run as one ungrouped call per group, others on
    :func:`grouped_tiled_conv2d`; layers with one input channel per group (depthwise) off
    the native kernels on :func:`depthwise_tiled_conv2d`.
    """
    if x.dim() == 3:  # unbatched, as nn.Conv2d accepts
        return tiled_conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, scheme, tiles,
                            training, generator, fixed_seed, index, groups, padding_mode).squeeze(0)
    check_dtype_device(x, weight)
    nk = weight.shape[0]
    nt = nk if tiles is None else tiles
    schemes.check_scheme(scheme, nt)
    if nk != schemes.num_kernels(scheme, nt):
        raise ValueError(f"weight.shape[0]={nk} does not match scheme={scheme!r} with tiles={nt}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[1] % groups:
        raise ValueError(f"groups={groups!r} must be a positive integer dividing the "
                         f"{weight.shape[1]} output channels")
    stride, dilation = _pair(stride), _pair(dilation)
    kh, kw = weight.shape[-2:]
    h0, w0 = x.shape[-2:]
    top, _, left, _ = resolve_padding(padding, (kh, kw), stride, dilation)
    if x.dim() == 4:
        x, padding = pad_input(x, padding, padding_mode, (kh, kw), stride, dilation)
    oh, ow = check_input(x, weight.shape[2] * groups, (kh, kw), stride, padding, dilation, nt)
    if index is None:
        index = schemes.assignment_index(scheme, nt, x.shape[0], oh, ow, training, generator,
                                         x.device, fixed_seed)
    if index is None:  # one kernel for every pixel: an ordinary convolution
        return F.conv2d(x, weight[0], None if bias is None else bias[0], stride, padding, dilation, groups)
    if index.dim() != 3 or index.shape[0] not in (1, x.shape[0]) or index.shape[1] != nk:
        raise ValueError(f"index of shape {tuple(index.shape)}: expected (B, {nk}, M) with B = 1 "
                         f"or the batch size {x.shape[0]}")
    if index.dtype != torch.int64:
        index = index.long()
    mask = None
    if scheme == "image_pad":  # regions of the input as given, before any padding
        mask = schemes.region_mask(nt, h0, w0, oh, ow, (kh, kw), stride, (top, left), dilation,
                                   x.device).to(x.dtype)
    covered = scheme != "perforated"  # every other scheme's index is a partition of the pixels
    if groups > 1 and native.supports_depthwise(x, weight, mask, groups):
        return native.NativeDepthwiseFn.apply(x, weight, bias, index, stride, padding, dilation,
                                              (oh, ow), covered)
    if groups > 1 and weight.shape[2] == 1:  # one input channel per group (depthwise, perhaps with a multiplier)
        return depthwise_tiled_conv2d(x, weight, bias, index, mask, stride, padding, dilation, (oh, ow),
                                      covered)
    if groups > GROUP_LOOP_MAX:
        return grouped_tiled_conv2d(x, weight, bias, index, mask, stride, padding, dilation,
                                    (oh, ow), groups)
    nchw = groups > 1 and native.supports(x, weight, mask) and not (x.stride(1) == 1 and x.shape[1] > 1)
    if nchw:  # one transposition here, not one per group: the groups' slices read channels-last
        x = channels_last(x)
    outs = []
    for xg, wg, bg in zip(x.chunk(groups, 1), weight.chunk(groups, 1),  # one call per group
                          [None] * groups if bias is None else bias.chunk(groups, 1)):
        if native.supports(xg, wg, mask):
            outs.append(native.NativeTiledConv2dFn.apply(xg, wg, bg, index, stride, padding, dilation,
                                                         (oh, ow), covered))
        else:
            outs.append(_TiledConv2dFn.apply(xg, wg, bg, index, mask, stride, padding, dilation,
                                             (oh, ow), covered))
    if groups == 1:
        return outs[0]
    out = torch.cat(outs, 1)
    return out.contiguous() if nchw else out


def grouped_tiled_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor,
                         mask: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                         dilation: tuple[int, int], out_size: tuple[int, int], groups: int) -> Tensor:
    """The PyTorch path of a grouped tiled convolution (autograd differentiates it).

    ``x`` (N, C, H, W), ``weight`` (nt, cout, C/groups, kh, kw), ``index`` (B, nt, M) with
    value ``np`` for an empty slot, ``mask`` (np, kh*kw) or ``None``. The patches are
    unfolded, gathered into slot order with an extra zero patch for empty slots, multiplied
    by each (tile, group) kernel matrix in one batched matmul and scattered back to pixel
    order (pixels no slot lists stay 0).
    """
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
                           mask: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                           dilation: tuple[int, int], out_size: tuple[int, int], covered: bool = True) -> Tensor:
    """The PyTorch path of a tiled convolution with one input channel per group (depthwise,
    ``groups == C``; ``cout = m * C`` with a channel multiplier ``m``); autograd differentiates it.

    A sum over the ``kh*kw`` kernel offsets of the input shifted by the offset (a strided view
    of the padded input) times every pixel's own weight, gathered from its tile: only
    output-sized tensors, no patch matrix. ``mask`` (np, kh*kw) zeroes reads (``image_pad``);
    pixels no slot lists (``covered=False``) are 0.
    """
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


def check_input(x: Tensor, in_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: Sequence[int], dilation: tuple[int, int], nt: int) -> tuple[int, int]:
    """Validate an input for a tiled conv, a batch (N, C, H, W) or one image (C, H, W);
    ``padding`` is ``(ph, pw)`` on both sides or ``(top, bottom, left, right)``. Return the
    output grid ``(oh, ow)``."""
    if x.dim() not in (3, 4):
        raise ValueError(f"input of shape {tuple(x.shape)}: expected (N, C, H, W) or (C, H, W)")
    if x.shape[-3] != in_channels:
        raise ValueError(f"input has {x.shape[-3]} channels (shape {tuple(x.shape)}); "
                         f"the layer expects in_channels={in_channels}")
    kh, kw = kernel_size
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    top, bottom, left, right = padding if len(padding) == 4 else (padding[0], padding[0], padding[1],
                                                                  padding[1])
    h, w = x.shape[-2] + top + bottom, x.shape[-1] + left + right
    if h < eh or w < ew:
        raise ValueError(f"input of size {tuple(x.shape[-2:])} (padded {h}x{w}) is smaller than "
                         f"the kernel ({eh}x{ew} with dilation)")
    oh, ow = conv_output_size(h, w, kernel_size, stride, 0, dilation)
    if nt > oh * ow:
        raise ValueError(f"tiles={nt} is more than the {oh * ow} output pixels ({oh}x{ow}) of an "
                         f"input of size {tuple(x.shape[-2:])}")
    return oh, ow


def tiled_conv2d_dense(x: Tensor, weight: Tensor, bias: Tensor | None, tile_map: Tensor,
                       stride: _size2 = 1, padding: _size2 | str = 0, dilation: _size2 = 1,
                       groups: int = 1) -> Tensor:
    """The naive method: convolve with all ``nt`` kernels, then pick each pixel's tile.

    ``nt`` times the MACs of a convolution; a reference and the benchmark's baseline.
    ``tile_map`` (B, np) holds each pixel's tile (-1: output 0).
    """
    nt, cout = weight.shape[:2]
    n, og = x.shape[0], cout // groups
    # (G, nt, og, ...): with groups, the stacked kernels of a group must be consecutive
    wg = weight.view(nt, groups, og, *weight.shape[2:]).transpose(0, 1).flatten(0, 2)
    bg = None if bias is None else bias.view(nt, groups, og).transpose(0, 1).flatten()
    y = F.conv2d(x, wg, bg, stride, padding, dilation, groups)  # (N, G*nt*og, oh, ow)
    oh, ow = y.shape[-2:]
    y = y.view(n, groups, nt, og, oh * ow).transpose(1, 2).reshape(n, nt, cout, oh * ow)
    sel = tile_map.clamp(min=0).view(-1, 1, 1, oh * ow).expand(n, 1, cout, oh * ow)
    out = y.gather(1, sel).view(n, cout, oh, ow)  # (N, cout, oh, ow)
    return out * (tile_map >= 0).view(-1, 1, oh, ow).to(out.dtype)
