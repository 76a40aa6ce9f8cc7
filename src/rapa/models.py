"""The paper's network: Caffe's ``cifar10_full`` with ReLU and RAPA conv layers (SPEC §2).

    conv1 5x5 pad 2, c1 -> ReLU -> pool1 (3x3/2) -> LRN
    conv2 5x5 pad 2, c2 -> ReLU -> pool2 (3x3/2) -> LRN
    conv3 5x5 pad 2, c3 -> ReLU -> avg pool (3x3/2) -> fully connected -> classes

The conv layers are :class:`rapa.TiledConv2d`; pool1 and pool2 are selectable
(:func:`rapa.pooling.make_pool`); LRN is Caffe's ``WITHIN_CHANNEL`` mode.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from rapa import schemes
from rapa.functional import channels_last
from rapa.lrn import WithinChannelLRN
from rapa.pooling import POOL_KINDS, MixedPool2d, make_pool
from rapa.tiled_conv import TiledConv2d

DEFAULT_CHANNELS: tuple[int, int, int] = (32, 32, 64)
ENLARGED_CHANNELS: tuple[int, int, int] = (54, 64, 64)  # the "no tiling enlarged" net
PAPER_TILES: tuple[int, int, int] = (16, 4, 1)  # balanced for np = (1024, 256, 64)
CONV_INIT_STD: tuple[float, float, float] = (1e-4, 0.01, 0.01)  # Caffe's Gaussian fillers
FC_INIT_STD: float = 0.01
INITS: tuple[str, ...] = ("caffe", "he")
"""Initialisations: ``caffe`` (SPEC §2, the paper's) and ``he`` (He et al. 2015: Gaussian
std ``sqrt(2 / fan_in)`` for every conv and the FC layer; the analog recipe's ``lsuv`` starts
from it, :mod:`rapa.lsuv`)."""
LAYER_NAMES: tuple[str, ...] = ("conv1", "conv2", "conv3", "fc")
"""The weight layers of :class:`ConvNet`, in forward order."""
_KERNEL, _CONV_PAD = 5, 2
_POOL_K, _POOL_S, _POOL_P = 3, 2, 1


def _pool_size(s: int) -> int:
    """Output side of a 3x3/2 pool with padding 1: ``ceil(s / 2)``."""
    return (s + 2 * _POOL_P - _POOL_K) // _POOL_S + 1


def conv_grids(image_size: int | Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Output grid ``(h, w)`` of the three conv layers on ``image_size`` inputs (``H`` or
    ``(H, W)``): a 5x5 conv with padding 2 keeps the size, each 3x3/2 pool halves it, rounding
    up: 32 -> 16 -> 8, 28 -> 14 -> 7."""
    grids = [tuple(_pair(image_size))]
    for _ in range(2):
        grids.append(tuple(_pool_size(s) for s in grids[-1]))
    return tuple(grids)  # type: ignore[return-value]


def output_pixels(image_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``np`` of the three conv layers on ``image_size`` inputs: (1024, 256, 64) for 32x32."""
    return tuple(h * w for h, w in conv_grids(image_size))  # type: ignore[return-value]


def check_tiles_fit(tiles: Sequence[int], scheme: str, image_size: int | Sequence[int],
                    name: str | None = None) -> tuple[int, int, int]:
    """The one check that ``tiles`` (one number per conv layer) fit the net on ``image_size``
    inputs (``name``, e.g. a dataset, for the message): a square number of tiles per layer for
    the grid schemes, and no more tiles than output pixels. ``ValueError``, one line naming the
    value, otherwise; returns the output pixels of every layer."""
    grids = conv_grids(image_size)
    fmt = ",".join(str(t) for t in tiles)
    nps = tuple(h * w for h, w in grids)
    for j, (nt, np_) in enumerate(zip(tiles, nps)):
        if scheme in schemes.GRID_SCHEMES and math.isqrt(nt) ** 2 != nt:
            raise ValueError(f"tiles {fmt}: scheme {scheme!r} needs a square number of tiles (q*q) per layer, "
                             f"conv{j + 1} has {nt} tiles")
        if nt > np_:
            h, w = grids[0]
            raise ValueError(f"tiles {fmt} do not fit {name or 'the input'} ({h}x{w}): conv{j + 1} has {nt} "
                             f"tiles but only {np_} output pixels ({grids[j][0]}x{grids[j][1]})")
    return nps  # type: ignore[return-value]


def _positive_ints(name: str, value: Any, length: int) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be a sequence of {length} positive integers") from None
    if len(out) != length or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name}={value!r} must be a sequence of {length} positive integers")
    return out


class ConvNet(nn.Module):
    """The paper's ConvNet with RAPA conv layers.

    ``tiles`` ``(nt1, nt2, nt3)`` per conv layer (``None``: untiled; scheme ``none``
    forces 1 per layer; for ``perforated`` it is the perforation factor). ``pooling`` is
    the kind of pool1 and pool2; pool3 is always average. ``image_size`` (``H`` or
    ``(H, W)``) fixes the fully connected layer's input size and is used to check that
    every layer has at least as many output pixels as tiles. ``generator`` drives the
    tile assignments, stochastic pooling and :meth:`reset_parameters`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        tiles: Sequence[int] | None = PAPER_TILES,
        scheme: str = "random",
        pooling: str = "max",
        image_size: int | Sequence[int] = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        init: str = "caffe",
        tile_init: str = "independent",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r} is unknown; choose one of {', '.join(INITS)}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        channels = _positive_ints("channels", channels, 3)
        if scheme not in schemes.SCHEMES:
            raise ValueError(f"scheme={scheme!r} is unknown; choose one of {', '.join(schemes.SCHEMES)}")
        if pooling not in POOL_KINDS:
            raise ValueError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOL_KINDS)}")
        size = _pair(image_size)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise ValueError(f"image_size={image_size!r} must be a positive integer or a pair of them")
        tiles = (1, 1, 1) if tiles is None or scheme == "none" else _positive_ints("tiles", tiles, 3)

        grids = conv_grids(size)
        nps = check_tiles_fit(tiles, scheme, size, f"image_size={image_size!r}")

        self.num_classes = num_classes
        self.in_channels = in_channels
        self.channels = channels
        self.tiles = tiles
        self.scheme = scheme
        self.pooling = pooling
        self.image_size = size
        self.output_pixels = nps
        self.generator = generator
        self.init = init
        self.tile_init = tile_init
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        c1, c2, c3 = channels
        conv: dict[str, Any] = dict(kernel_size=_KERNEL, padding=_CONV_PAD, scheme=scheme,
                                    generator=generator, tile_init=tile_init, **factory)
        pool: dict[str, Any] = dict(kernel_size=_POOL_K, stride=_POOL_S, padding=_POOL_P,
                                    generator=generator, **factory)
        self.conv1 = TiledConv2d(in_channels, c1, tiles=tiles[0], **conv)
        self.pool1 = make_pool(pooling, c1, **pool)
        self.norm1 = WithinChannelLRN()
        self.conv2 = TiledConv2d(c1, c2, tiles=tiles[1], **conv)
        self.pool2 = make_pool(pooling, c2, **pool)
        self.norm2 = WithinChannelLRN()
        self.conv3 = TiledConv2d(c2, c3, tiles=tiles[2], **conv)
        self.pool3 = nn.AvgPool2d(_POOL_K, _POOL_S, _POOL_P, count_include_pad=False)
        fh, fw = (_pool_size(s) for s in grids[2])
        self.fc = nn.Linear(c3 * fh * fw, num_classes, **factory)
        self.reset_parameters()

    @classmethod
    def enlarged(cls, **kwargs: Any) -> "ConvNet":
        """The untiled "enlarged" net, channels :data:`ENLARGED_CHANNELS` (overridable)."""
        kwargs.setdefault("channels", ENLARGED_CHANNELS)
        kwargs.setdefault("tiles", None)
        return cls(**kwargs)

    @property
    def convs(self) -> list[TiledConv2d]:
        """The three conv layers, in order."""
        return [self.conv1, self.conv2, self.conv3]

    def conv_weight_count(self) -> int:
        """Number of conv-layer weights, biases included, over all tiles."""
        return sum(p.numel() for layer in self.convs for p in layer.parameters())

    def _normal_(self, t: Tensor, std: float) -> None:
        g = self.generator
        if g is None or torch.device(g.device) == t.device:
            t.normal_(0.0, std, generator=g)
        else:
            t.copy_(torch.empty(t.shape, dtype=t.dtype, device=g.device).normal_(0.0, std, generator=g))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initialisation ``self.init``: Caffe's Gaussian std 1e-4 (conv1), 0.01 (conv2,
        conv3, FC), or He's ``sqrt(2 / fan_in)``; biases 0; the tiles of a layer drawn
        independently, or with ``tile_init="replicate"`` the first tile's draw copied into every
        tile; mixed pooling ``beta = 2/mu``."""
        he = getattr(self, "init", "caffe") == "he"
        for layer, std in zip(self.convs, CONV_INIT_STD):
            fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            self._normal_(layer.weight, math.sqrt(2.0 / fan_in) if he else std)
            layer.replicate_tiles_()  # tile_init="replicate": tile 0's draw in every tile
            if layer.bias is not None:
                layer.bias.zero_()
        self._normal_(self.fc.weight, math.sqrt(2.0 / self.fc.in_features) if he else FC_INIT_STD)
        self.fc.bias.zero_()
        for pool in (self.pool1, self.pool2):
            if isinstance(pool, MixedPool2d):
                pool.reset_parameters()

    def forward(self, x: Tensor, indices: Sequence[Tensor | None] | None = None) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, C, H, W)`` of ``image_size``.

        ``indices`` optionally gives each conv layer's gather index ``(B, nt, M)`` (or
        ``None`` for the layer's own draw), see :meth:`rapa.TiledConv2d.assignment`.
        """
        if x.dim() != 4 or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected (N, {self.in_channels}, "
                             f"{self.image_size[0]}, {self.image_size[1]}) for image_size={self.image_size}")
        if indices is None:
            indices = (None, None, None)
        elif len(indices) != 3:
            raise ValueError(f"indices has {len(indices)} entries: expected one per conv layer (3)")
        # channels-last memory end to end: the tiled convs gather pixel rows, and
        # NCHW would cost a transposition per layer and direction (the values are the same)
        x = channels_last(x)
        x = self.norm1(self.pool1(F.relu(self.conv1(x, indices[0]))))  # (N, c1, H/2, W/2)
        x = self.norm2(self.pool2(F.relu(self.conv2(x, indices[1]))))  # (N, c2, H/4, W/4)
        x = self.pool3(F.relu(self.conv3(x, indices[2])))  # (N, c3, H/8, W/8)
        return self.fc(x.flatten(1))  # (N, num_classes)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, tiles={self.tiles}, scheme={self.scheme!r}, "
                f"pooling={self.pooling!r}, image_size={self.image_size}")


_BUILD_KEYS = ("num_classes", "in_channels", "channels", "tiles", "scheme", "pooling", "image_size",
               "device", "dtype", "generator", "init", "tile_init")


def build_model(config: Mapping[str, Any] | None = None, **kwargs: Any) -> ConvNet:
    """A :class:`ConvNet` from a dict of its arguments (``kwargs`` override it).

    ``channels`` may also be ``"default"`` or ``"enlarged"``; ``tiles`` may be ``"paper"``
    (``(16, 4, 1)``) or ``None``/``"none"`` (untiled). Unknown keys raise ``ValueError``.
    """
    params = {**(config or {}), **kwargs}
    unknown = sorted(set(params) - set(_BUILD_KEYS))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; expected some of {list(_BUILD_KEYS)}")
    channels = params.get("channels")
    if isinstance(channels, str):
        names = {"default": DEFAULT_CHANNELS, "enlarged": ENLARGED_CHANNELS}
        if channels not in names:
            raise ValueError(f"channels={channels!r}: give three numbers or one of {list(names)}")
        params["channels"] = names[channels]
    tiles = params.get("tiles", PAPER_TILES)
    if isinstance(tiles, str):
        if tiles not in ("paper", "none"):
            raise ValueError(f"tiles={tiles!r}: give three numbers, 'paper' or 'none'")
        params["tiles"] = PAPER_TILES if tiles == "paper" else None
    return ConvNet(**params)
