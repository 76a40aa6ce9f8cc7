"""The functional RAPA convolution: ``np`` patches times one of ``nt`` kernel matrices each.

:func:`tiled_conv2d` validates a call, draws the assignment (:mod:`rapa.schemes`), and hands
it to an implementation in :mod:`rapa.ops`: the native CPU kernels (:mod:`rapa.ops.native`,
CPU float32 where they build), or the PyTorch path (:mod:`rapa.ops.torch_path`: any device
and dtype; :func:`grouped_tiled_conv2d` and :func:`depthwise_tiled_conv2d` for grouped
layers). Also here: ``nn.Conv2d``'s padding rules (:func:`resolve_padding`,
:func:`pad_input`, :func:`conv_output_size`), the input checks of a tiled layer, and the
dense reference :func:`tiled_conv2d_dense`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from rapa import schemes
from rapa.ops import native, native_op
from rapa.ops.geometry import ConvGeometry, Size2
from rapa.ops.reference import tiled_conv2d_dense
from rapa.ops.torch_path import TiledConv2dFn, depthwise_tiled_conv2d, grouped_tiled_conv2d
from rapa.ops.workspace import scratch

__all__ = ["PADDING_MODES", "GROUP_LOOP_MAX", "channels_last", "resolve_padding", "conv_output_size", "pad_input",
           "tiled_conv2d", "grouped_tiled_conv2d", "depthwise_tiled_conv2d", "tiled_conv2d_dense", "check_input",
           "check_dtype_device", "clear_workspace", "random_native_conv2d"]

_size2 = Size2  # the name other modules have imported


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
    pad, zero = _pad_plan(padding, padding_mode, kernel_size, stride, dilation)
    if pad is not None:
        x = F.pad(x, pad[0], mode=pad[1])
    return x, zero


def _pad_plan(padding: _size2 | str, padding_mode: str, kernel_size: _size2, stride: _size2,
              dilation: _size2) -> tuple[tuple[tuple[int, int, int, int], str] | None, tuple[int, int]]:
    """How :func:`pad_input` pads: the ``F.pad`` arguments ``((left, right, top, bottom), mode)``
    to apply to the input (None: nothing), and the zero padding ``(ph, pw)`` left to the
    convolution on both sides."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
    top, bottom, left, right = resolve_padding(padding, kernel_size, stride, dilation)
    if padding_mode == "zeros" and top == bottom and left == right:
        return None, (top, left)
    if top or bottom or left or right:
        return ((left, right, top, bottom), "constant" if padding_mode == "zeros" else padding_mode), (0, 0)
    return None, (0, 0)


GROUP_LOOP_MAX = 16
"""Grouped layers with up to this many groups run one ungrouped tiled convolution per group;
more groups (depthwise layers off the native kernels) take :func:`grouped_tiled_conv2d`."""


def clear_workspace() -> None:
    """Free the calling thread's scratch buffers and index tables of the CPU path, and the
    native kernels' per-thread scratch.

    They are kept between calls for speed and grow to the largest batch seen (the padded
    input of a layer, and about ``rapa.ops.torch_path.CPU_CHUNK_BYTES`` per buffer otherwise)."""
    scratch.clear()
    native.clear_scratch()


def first_tile(p: Tensor | None) -> Tensor | None:
    """Tile 0 of a tiled weight or bias ``(nt, ...)``, for the plan of an ordinary convolution;
    with one tile a squeeze, whose backward passes the gradient through instead of scattering
    it into a zeroed copy of the whole parameter (the paper's conv3 at batch 10: 1.06x -> 1.04x
    of ``nn.Conv2d``)."""
    if p is None:
        return None
    return p.squeeze(0) if p.shape[0] == 1 else p[0]


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
    float32 calls run on the native kernels of :mod:`rapa.ops.native` where they build
    (ungrouped and depthwise layers); other calls on the PyTorch path. Grouped layers with
    up to :data:`GROUP_LOOP_MAX` groups run as one ungrouped call per group, others on
    :func:`grouped_tiled_conv2d`; layers with one input channel per group (depthwise) off
    the native kernels on :func:`depthwise_tiled_conv2d`.
    """
    if x.dim() == 3:  # unbatched, as nn.Conv2d accepts
        return tiled_conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, scheme, tiles,
                            training, generator, fixed_seed, index, groups, padding_mode).squeeze(0)
    check_dtype_device(x, weight)
    try:  # the checks and sizes that depend on shapes and arguments only, memoised
        call = _static_call(tuple(x.shape), tuple(weight.shape), _hashable(stride), _hashable(padding),
                            _hashable(dilation), scheme, tiles, groups, padding_mode)
    except TypeError:  # an argument that cannot be a memo key (it is checked on the way)
        call = _static_call.__wrapped__(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, scheme,
                                        tiles, groups, padding_mode)
    nk, nt, stride, dilation, (top, left), pad, padding, (oh, ow) = call
    kh, kw = weight.shape[-2:]
    h0, w0 = x.shape[-2:]
    if pad is not None:  # padding modes other than zeros, or an asymmetric 'same'
        x = F.pad(x, pad[0], mode=pad[1])
    if index is None:
        index = schemes.assignment_index(scheme, nt, x.shape[0], oh, ow, training, generator,
                                         x.device, fixed_seed)
    if index is not None and (index.dim() != 3 or index.shape[0] not in (1, x.shape[0]) or index.shape[1] != nk):
        raise ValueError(f"index of shape {tuple(index.shape)}: expected (B, {nk}, M) with B = 1 "
                         f"or the batch size {x.shape[0]}")
    tp = schemes.plan(scheme, nt, index, (h0, w0), (oh, ow), (kh, kw), stride, (top, left), dilation,
                      x.dtype, x.device)
    if tp.index is None:  # one kernel for every pixel: an ordinary convolution
        return F.conv2d(x, first_tile(weight), first_tile(bias), stride, padding, dilation, groups)
    index, mask, covered = tp.index, tp.mask, tp.covered
    if index.dtype != torch.int64:
        index = index.long()
    geo = ConvGeometry.of(x, weight, index, stride, padding, dilation, (oh, ow))
    if groups > 1 and native.supports_depthwise(x, weight, mask, groups):
        return native.NativeDepthwiseFn.apply(x, weight, bias, index, geo, covered)
    if groups > 1 and weight.shape[2] == 1:  # one input channel per group (depthwise, perhaps with a multiplier)
        return depthwise_tiled_conv2d(x, weight, bias, index, mask, geo, covered)
    if groups > GROUP_LOOP_MAX:
        return grouped_tiled_conv2d(x, weight, bias, index, mask, geo, groups)
    if groups > 1:
        geo = geo.with_channels(geo.in_channels // groups, geo.out_channels // groups)
    # one call per group; an ungrouped layer is not chunked (a chunk of one would put a split
    # into the graph, whose backward copies every gradient)
    parts = [(x, weight, bias)] if groups == 1 else zip(
        x.chunk(groups, 1), weight.chunk(groups, 1), [None] * groups if bias is None else bias.chunk(groups, 1))
    outs = []
    for xg, wg, bg in parts:
        if native.supports(xg, wg, mask):
            outs.append(_native_call(xg, wg, bg, index, geo, covered))
        else:
            outs.append(TiledConv2dFn.apply(xg, wg, bg, index, mask, geo, covered))
    return outs[0] if groups == 1 else torch.cat(outs, 1)  # (each in x's memory format)


@torch.compiler.disable  # run eagerly under torch.compile (a graph break), as the ctypes path was
def _native_call(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, geo: ConvGeometry,
                 covered: bool) -> Tensor:
    """One ungrouped call of the native kernels with a given index: through the C++ operator
    ``rapa::tiled_conv`` where it is built (:mod:`rapa.ops.native_op`), else through ctypes. The
    operators have no fake-tensor kernels, so ``torch.compile`` runs this part eagerly (0.4 us a
    call without it)."""
    op = native_op.tiled()  # the same kernels and results with the autograd in C++
    if op is not None:
        return op(x, weight, bias, index, native_op.fields(geo, torch.get_num_threads()), covered)
    return native.NativeTiledConv2dFn.apply(x, weight, bias, index, geo, covered)


@torch.compiler.disable  # run eagerly under torch.compile (a graph break): see _native_call
def random_native_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: _size2, padding: _size2 | str,
                         dilation: _size2, padding_mode: str = "zeros",
                         generator: torch.Generator | None = None) -> Tensor | None:
    """:func:`tiled_conv2d` with ``scheme="random"`` in one lean call where it takes the native
    kernels: a batch (N, C, H, W), CPU float32, ungrouped ``weight`` of more than one tile, zero
    padding on both sides alike and every tile the same number of pixels (``np`` a multiple of
    ``nt``). The same draw from ``generator`` and the same result; ``None`` (nothing drawn)
    elsewhere, where the caller takes :func:`tiled_conv2d`. The checks that depend on shapes
    only are memoised (12-13 us less Python than the general path), and the draw, the forward
    kernel and the backward run in one C++ operator with its own autograd
    (:mod:`rapa.ops.native_op`; the ctypes path where it cannot be built): a training step of
    the paper's conv1 at batch 10 about 56 us (7%) faster than through ctypes and a Python
    ``autograd.Function`` (README, Benchmarks)."""
    if x.dim() != 4 or weight.device != x.device or not native.supports(x, weight, None):
        return None
    try:
        spec = _random_native_spec(tuple(x.shape), tuple(weight.shape), _hashable(stride), _hashable(padding),
                                   _hashable(dilation), padding_mode)
    except TypeError:  # an argument that cannot be a memo key: the general path checks it
        return None
    if spec is None:
        return None
    geo, np_, nt = spec
    if generator is None or generator.device.type == "cpu":
        op = native_op.op()  # the same draw, kernels and results with the autograd in C++
        if op is not None:
            return op(x, weight, bias, generator, native_op.fields(geo, torch.get_num_threads()))
    index = native.randperm_rows(x.shape[0], np_, generator, nt)  # (N, nt, M), as schemes draws it
    if index is None:
        return None
    return _native_call(x, weight, bias, index, geo, True)


@functools.lru_cache(maxsize=256, typed=True)
def _random_native_spec(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride, padding, dilation,
                        padding_mode: str) -> tuple[ConvGeometry, int, int] | None:
    """For :func:`random_native_conv2d`: its geometry, ``np`` and ``nt``, or ``None`` where the
    lean call does not apply; the general call's checks first (``ValueError`` as they give it)."""
    nk, nt, stride, dilation, _, pad, zero, (oh, ow) = _static_call(x_shape, w_shape, stride, padding, dilation,
                                                                  "random", None, 1, padding_mode)
    np_ = oh * ow
    if nt == 1 or pad is not None or np_ % nt:  # an ordinary convolution (no draw), F.pad first, or
        return None  # uneven tiles (one more draw per image)
    n, c, h, w = x_shape
    geo = ConvGeometry(n, c, h, w, tuple(w_shape[-2:]), stride, zero, dilation, (oh, ow), nt, w_shape[1], n,
                       np_ // nt)
    return geo, np_, nt


def _hashable(value):
    """``value`` with lists made tuples (a memo key); anything else as it is."""
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=256, typed=True)
def _static_call(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride, padding, dilation, scheme: str,
                 tiles: int | None, groups: int, padding_mode: str):
    """The checks of a :func:`tiled_conv2d` call that depend on its shapes and arguments only,
    and what it needs from them: ``(nk, nt, stride, dilation, (top, left), pad, padding, (oh, ow))``
    with ``pad`` the ``F.pad`` arguments to apply first (or None) and ``padding`` the zero
    padding ``(ph, pw)`` left to the convolution. ``ValueError`` naming the value otherwise."""
    nk = w_shape[0]
    nt = nk if tiles is None else tiles
    schemes.check_scheme(scheme, nt)
    if nk != schemes.num_kernels(scheme, nt):
        raise ValueError(f"weight.shape[0]={nk} does not match scheme={scheme!r} with tiles={nt}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or w_shape[1] % groups:
        raise ValueError(f"groups={groups!r} must be a positive integer dividing the "
                         f"{w_shape[1]} output channels")
    stride, dilation = tuple(_pair(stride)), tuple(_pair(dilation))
    kh, kw = w_shape[-2:]
    top, bottom, left, right = resolve_padding(padding, (kh, kw), stride, dilation)
    pad, zero = _pad_plan(padding, padding_mode, (kh, kw), stride, dilation)
    padded = x_shape[:-2] + (x_shape[-2] + top + bottom - 2 * zero[0], x_shape[-1] + left + right - 2 * zero[1])
    oh, ow = _check_shape(padded, w_shape[2] * groups, (kh, kw), stride, zero, dilation, nt)
    return nk, nt, stride, dilation, (top, left), pad, zero, (oh, ow)


def check_input(x: Tensor, in_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: Sequence[int], dilation: tuple[int, int], nt: int) -> tuple[int, int]:
    """Validate an input for a tiled conv, a batch (N, C, H, W) or one image (C, H, W);
    ``padding`` is ``(ph, pw)`` on both sides or ``(top, bottom, left, right)``. Return the
    output grid ``(oh, ow)``."""
    return _check_shape(tuple(x.shape), in_channels, tuple(kernel_size), tuple(stride), tuple(padding),
                        tuple(dilation), nt)


@functools.lru_cache(maxsize=256, typed=True)
def _check_shape(shape: tuple[int, ...], in_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, ...], dilation: tuple[int, int], nt: int) -> tuple[int, int]:
    """:func:`check_input` on an input's shape (memoised: shapes repeat from call to call)."""
    if len(shape) not in (3, 4):
        raise ValueError(f"input of shape {shape}: expected (N, C, H, W) or (C, H, W)")
    if shape[-3] != in_channels:
        raise ValueError(f"input has {shape[-3]} channels (shape {shape}); "
                         f"the layer expects in_channels={in_channels}")
    kh, kw = kernel_size
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    top, bottom, left, right = padding if len(padding) == 4 else (padding[0], padding[0], padding[1],
                                                                  padding[1])
    h, w = shape[-2] + top + bottom, shape[-1] + left + right
    if h < eh or w < ew:
        raise ValueError(f"input of size {shape[-2:]} (padded {h}x{w}) is smaller than "
                         f"the kernel ({eh}x{ew} with dilation)")
    oh, ow = conv_output_size(h, w, kernel_size, stride, 0, dilation)
    if nt > oh * ow:
        raise ValueError(f"tiles={nt} is more than the {oh * ow} output pixels ({oh}x{ow}) of an "
                         f"input of size {shape[-2:]}")
    return oh, ow

