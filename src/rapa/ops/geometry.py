"""The geometry of one tiled convolution: one typed value for every implementation.

:class:`ConvGeometry` holds the sizes of a call (input, kernel, stride, padding, dilation,
output grid, tiles, gather index); the PyTorch path reads its fields, and the native C++
kernels receive it as ONE struct, :class:`NativeGeometry`, whose fields mirror ``struct Geo``
in ``csrc/tiled_conv.cpp`` (the loader checks that both have the same size).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

Size2 = int | Sequence[int]
"""A size given as one number (both sides) or a pair ``(height, width)``, as ``nn.Conv2d`` takes."""


def round_up(v: int, m: int) -> int:
    """``v`` rounded up to a multiple of ``m``."""
    return -(-v // m) * m


@dataclass(frozen=True, slots=True)
class ConvGeometry:
    """The sizes of one tiled convolution ``x`` (N, C, H, W) with ``weight`` (nt, cout, C, kh, kw)
    and a gather index (B, nt, M); made once per call by :func:`rapa.functional.tiled_conv2d`."""

    batch: int
    """``N``: images in the input."""
    in_channels: int
    """``C``: channels of the input (of one group's slice for grouped layers)."""
    height: int
    """``H``: input rows, before the zero padding of :attr:`padding`."""
    width: int
    """``W``: input columns, before the zero padding."""
    kernel: tuple[int, int]
    """``(kh, kw)``: the kernel window."""
    stride: tuple[int, int]
    """``(sh, sw)``: the stride."""
    padding: tuple[int, int]
    """``(ph, pw)``: zero padding on both sides (other modes are applied to ``x`` before)."""
    dilation: tuple[int, int]
    """``(dh, dw)``: the dilation of the kernel window."""
    out_size: tuple[int, int]
    """``(oh, ow)``: the output grid."""
    tiles: int
    """``nt``: kernel matrices in the weight (1 for ``perforated``)."""
    out_channels: int
    """``cout``: output channels of one kernel matrix."""
    index_batch: int
    """``B``: rows of the gather index, 1 (one assignment for all images) or ``N``."""
    slots: int
    """``M``: slots per tile in the gather index (``np`` marks an empty one)."""

    @classmethod
    def of(cls, x: Tensor, weight: Tensor, index: Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], out_size: tuple[int, int]) -> "ConvGeometry":
        """The geometry of ``x`` (N, C, H, W), ``weight`` (nt, cout, C', kh, kw) and ``index``
        (B, nt, M) with the given convolution parameters."""
        n, c, h, w = x.shape
        nt, cout, _, kh, kw = weight.shape
        return cls(n, c, h, w, (kh, kw), tuple(stride), tuple(padding), tuple(dilation),  # type: ignore[arg-type]
                   tuple(out_size), nt, cout, index.shape[0], index.shape[2])  # type: ignore[arg-type]

    def with_channels(self, in_channels: int, out_channels: int) -> "ConvGeometry":
        """The same geometry for a slice of the channels (one group of a grouped layer)."""
        return ConvGeometry(self.batch, in_channels, self.height, self.width, self.kernel, self.stride, self.padding,
                            self.dilation, self.out_size, self.tiles, out_channels, self.index_batch, self.slots)

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(Hp, Wp)``: the input's size with its zero padding."""
        return self.height + 2 * self.padding[0], self.width + 2 * self.padding[1]

    @property
    def num_pixels(self) -> int:
        """``np = oh * ow``: output pixels per image."""
        return self.out_size[0] * self.out_size[1]

    @property
    def patch_size(self) -> int:
        """``K = C * kh * kw``: numbers in one patch."""
        return self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def padded_numel(self) -> int:
        """Numbers in the zero-padded input ``(N, Hp, Wp, C)``."""
        hp, wp = self.padded_size
        return self.batch * hp * wp * self.in_channels

    def native(self, vector_width: int, threads: int, layout: int = 0) -> "NativeGeometry":
        """This geometry as the native kernels read it: output channels and patch length
        padded to whole vectors of ``vector_width`` floats, ``threads`` OpenMP threads;
        ``layout``: bit 0, ``x`` (and the output, the input gradient) is NCHW, else channels-last;
        bit 1, the output gradient is NCHW; bit 2, not every output pixel is listed (forward)."""
        (kh, kw), (ph, pw), cout = self.kernel, self.padding, self.out_channels
        return NativeGeometry(  # positionally, in the order of NATIVE_FIELDS (faster than by keyword)
            self.batch, self.in_channels, self.height + 2 * ph, self.width + 2 * pw, kh, kw, *self.stride,
            *self.dilation, *self.out_size, self.tiles, cout, round_up(cout, vector_width),
            round_up(self.in_channels * kh * kw, vector_width), self.index_batch, self.slots, threads, self.height,
            self.width, ph, pw, layout)


NATIVE_FIELDS: tuple[str, ...] = ("n", "c", "hp", "wp", "kh", "kw", "sh", "sw", "dh", "dw", "oh", "ow", "nt",
                                  "cout", "cp", "kp", "bsz", "m", "nth", "h", "w", "ph", "pw", "layout")
"""The fields of ``struct Geo`` in ``csrc/tiled_conv.cpp``, in its order (all ``int64_t``)."""


class NativeGeometry(ctypes.Structure):
    """``struct Geo`` of the C++ kernels: :class:`ConvGeometry` plus the vector-padded
    channel count ``cp`` and patch length ``kp``, the thread count ``nth`` and ``layout``;
    passed to them by reference (``ctypes.byref``)."""

    _fields_ = [(name, ctypes.c_int64) for name in NATIVE_FIELDS]
