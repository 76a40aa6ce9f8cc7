"""The dense reference of the tiled convolution: every tile's ordinary convolution, then each
pixel's tile. ``nt`` times the MACs of a convolution; the tests' reference and the baseline
of ``rapa bench conv``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rapa.ops.geometry import Size2


def tiled_conv2d_dense(x: Tensor, weight: Tensor, bias: Tensor | None, tile_map: Tensor,
                       stride: Size2 = 1, padding: Size2 | str = 0, dilation: Size2 = 1,
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
