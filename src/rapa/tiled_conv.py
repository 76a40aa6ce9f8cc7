"""``TiledConv2d``: a conv layer with ``nt`` replicated kernel matrices (tiles), SPEC §1.

:class:`TiledConvBase` holds what every tiled layer shares, the digital one here and the
analog one of :mod:`rapa.analog.layers`: the arguments, as ``nn.Conv2d`` takes them, the
scheme's assignment of pixels to tiles (cached for fixed schemes) and its
:class:`rapa.schemes.TilePlan`; subclasses own the kernel matrices and the forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from rapa import schemes
from rapa.functional import (PADDING_MODES, _size2, check_dtype_device, check_input, conv_output_size, first_tile,
                             pad_input, random_native_conv2d, resolve_padding, tiled_conv2d)


def check_conv_args(in_channels: int, out_channels: int, kernel_size: _size2, stride: _size2,
                    padding: _size2 | str, dilation: _size2, scheme: str, tiles: int,
                    groups: int = 1, padding_mode: str = "zeros"):
    """Validate a tiled conv's arguments (``ValueError`` naming the value), as ``nn.Conv2d``
    accepts them; return ``(kernel_size, stride, padding, dilation)``, as pairs except a
    padding string (``'same'``, ``'valid'``), which is kept."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                         f"out_channels={out_channels}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r}: expected one of {', '.join(PADDING_MODES)}")
    schemes.check_scheme(scheme, tiles)
    names = ("kernel_size", "stride", "dilation")
    pairs = dict(zip(names, map(_pair, (kernel_size, stride, dilation))))
    if not isinstance(padding, str):
        pairs["padding"] = _pair(padding)
    for name, value in pairs.items():
        low = 0 if name == "padding" else 1
        if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
            raise ValueError(f"{name}={value!r} must be integers >= {low}")
    if isinstance(padding, str):
        resolve_padding(padding, pairs["kernel_size"], pairs["stride"], pairs["dilation"])  # validates
    return (pairs["kernel_size"], pairs["stride"], pairs.get("padding", padding), pairs["dilation"])


class TiledConvBase(nn.Module):
    """What every tiled conv layer shares: ``nn.Conv2d``'s arguments plus ``tiles`` and
    ``scheme``, the assignment of the output pixels to the tiles and its plan.

    Subclasses hold ``nk = schemes.num_kernels(scheme, tiles)`` kernel matrices (their
    :attr:`num_kernels`) and apply them in ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _size2, stride: _size2,
                 padding: _size2 | str, dilation: _size2, tiles: int, scheme: str,
                 generator: torch.Generator | None, groups: int, padding_mode: str) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = check_conv_args(
            in_channels, out_channels, kernel_size, stride, padding, dilation, scheme, tiles,
            groups, padding_mode)
        self.groups = groups
        self.padding_mode = padding_mode
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.tiles = tiles
        self.scheme = scheme
        self.generator = generator
        self._index_cache: dict[tuple, Tensor] = {}

    def _init_assignment(self, seed_device: torch.device | str | None) -> None:
        """Draw the ``random_fixed`` seed (a buffer on ``seed_device``; ``None`` for other
        schemes); subclasses call it where their draws from ``generator`` put it."""
        if self.scheme == "random_fixed":  # the partition is a function of this seed: saved state
            g = self.generator
            seed = torch.randint(0, 2**62, (), generator=g, device="cpu" if g is None else g.device)
            self.register_buffer("fixed_seed", seed.to(device=seed_device))
        else:
            self.fixed_seed = None

    @property
    def num_kernels(self) -> int:
        """Number of kernel matrices held."""
        raise NotImplementedError

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Output grid ``(oh, ow)`` for an ``h x w`` input."""
        return conv_output_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    def assignment(self, x: Tensor) -> Tensor | None:
        """Gather index ``(B, nt, M)`` for this forward pass on ``x`` (``None``: plain conv);
        ``B`` is 1 for an unbatched ``x`` (C, H, W)."""
        pads = resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        oh, ow = check_input(x, self.in_channels, self.kernel_size, self.stride, pads, self.dilation,
                             self.tiles)
        batch = 1 if x.dim() == 3 else x.shape[0]
        if self.scheme in ("random_fixed", *schemes.GRID_SCHEMES):  # fixed: compute once per grid
            key = (oh, ow, x.device, None if self.fixed_seed is None else int(self.fixed_seed))
            index = self._index_cache.get(key)
            if index is None:
                index = schemes.assignment_index(
                    self.scheme, self.tiles, 1, oh, ow, device=x.device,
                    fixed_seed=None if self.fixed_seed is None else int(self.fixed_seed))
                self._index_cache = {key: index}
            return index
        return schemes.assignment_index(self.scheme, self.tiles, batch, oh, ow, self.training,
                                        self.generator, x.device)

    def plan(self, x: Tensor, index: Tensor | None = None) -> schemes.TilePlan:
        """The :class:`rapa.schemes.TilePlan` of this forward pass on ``x`` as given (before any
        padding): ``index`` (B, nt, M), or the scheme's own draw, its ``image_pad`` mask (in
        ``x``'s dtype) and coverage."""
        if index is None:
            index = self.assignment(x)
        h, w = x.shape[-2:]
        top, _, left, _ = resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        return schemes.plan(self.scheme, self.tiles, index, (h, w), self.output_size(h, w), self.kernel_size,
                            self.stride, (top, left), self.dilation, x.dtype, x.device)

    def tile_map(self, x: Tensor) -> Tensor:
        """Tile of every output pixel ``(B, np)`` for one forward pass (-1: perforated away)."""
        index = self.assignment(x)
        oh, ow = self.output_size(x.shape[-2], x.shape[-1])
        if index is None:
            return torch.zeros(1, oh * ow, dtype=torch.long, device=x.device)
        return schemes.index_to_tile_map(index, oh * ow)

    def _has_bias(self) -> bool:
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if not self._has_bias():
            s += ", bias=False"
        return s + f", tiles={self.tiles}, scheme={self.scheme!r}"


TILE_INITS: tuple[str, ...] = ("independent", "replicate")
"""How the kernel replicas of a tiled layer start: ``independent`` (each tile its own draw, as
Caffe's fillers do for separate blobs) or ``replicate`` (one draw copied into every tile, so that
the layer starts as one ordinary convolution, SPEC §1)."""


def tile_correlation(weight: Tensor) -> Tensor:
    """Mean Pearson correlation over all pairs of tiles, per output channel: how alike a tiled
    layer's replicas are (SPEC §4; :mod:`rapa.analysis.similarity` averages it over channels and
    layers, :func:`rapa.analog.diagnostics.replica_similarity` reads it off analog arrays).

    ``weight`` is ``(nk, cout, ...)`` (a :class:`rapa.TiledConv2d` weight); returns
    ``(cout,)`` float64. Pairs with a constant filter are skipped; a channel with no valid
    pair is NaN. Needs ``nk >= 2``.
    """
    if weight.dim() < 2 or weight.shape[0] < 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: need (nk >= 2, cout, ...)")
    nk, cout = weight.shape[:2]
    w = weight.detach().to(torch.float64).reshape(nk, cout, -1).transpose(0, 1)  # (cout, nk, k)
    w = w - w.mean(2, keepdim=True)
    norm = w.norm(dim=2, keepdim=True)  # (cout, nk, 1)
    valid = (norm > 0).squeeze(2).to(torch.float64)  # (cout, nk)
    z = w / norm.clamp_min(torch.finfo(torch.float64).tiny)  # (cout, nk, k) unit vectors
    corr = z @ z.transpose(1, 2)  # (cout, nk, nk) Pearson correlations
    pair_ok = valid.unsqueeze(2) * valid.unsqueeze(1)  # (cout, nk, nk)
    off = 1.0 - torch.eye(nk, dtype=torch.float64, device=w.device)  # (nk, nk) all pairs i != j
    total = (corr.clamp(-1.0, 1.0) * pair_ok * off).sum((1, 2))  # (cout,)
    count = (pair_ok * off).sum((1, 2))  # (cout,)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


class TiledConv2d(TiledConvBase):
    """Convolution whose output pixels are divided among ``tiles`` kernel matrices.

    Shaped like ``nn.Conv2d`` and accepting what it accepts (``groups``, ``padding_mode``,
    ``padding='same'``/``'valid'``, unbatched ``(C, H, W)`` inputs). ``weight`` is
    ``(nk, out_channels, in_channels/groups, kh, kw)`` and ``bias`` ``(nk, out_channels)``; with
    ``groups > 1`` a tile holds one kernel matrix per group, used for the same pixels.
    ``nk = tiles`` except for ``none`` and ``perforated`` (one kernel; ``tiles`` is then the
    perforation factor). ``scheme`` is one of :data:`rapa.schemes.SCHEMES`. Random draws use ``generator`` when given,
    otherwise torch's global generator (so ``torch.manual_seed`` makes runs repeatable).
    ``tile_init`` (:data:`TILE_INITS`): the tiles drawn independently (the default) or as copies of
    one draw (``replicate``: the random scheme then keeps them alike; README, Training).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size2,
        stride: _size2 = 1,
        padding: _size2 | str = 0,
        dilation: _size2 = 1,
        bias: bool = True,
        tiles: int = 1,
        scheme: str = "random",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        groups: int = 1,
        padding_mode: str = "zeros",
        tile_init: str = "independent",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, tiles, scheme,
                         generator, groups, padding_mode)
        if tile_init not in TILE_INITS:
            raise ValueError(f"tile_init={tile_init!r} is unknown; choose one of {', '.join(TILE_INITS)}")
        self.tile_init = tile_init
        nk = schemes.num_kernels(scheme, tiles)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(nk, out_channels, in_channels // groups, *self.kernel_size,
                                                **factory))
        self.bias = nn.Parameter(torch.empty(nk, out_channels, **factory)) if bias else None
        self._init_assignment(device)
        self.reset_parameters()

    @property
    def num_kernels(self) -> int:
        """Number of kernel matrices held (``weight.shape[0]``)."""
        return self.weight.shape[0]

    def _has_bias(self) -> bool:
        return self.bias is not None

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default initialisation, drawn independently for every tile, or drawn
        once and copied into every tile (``tile_init="replicate"``)."""
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        for j in range(self.num_kernels):  # per tile: init is not a hot path
            nn.init.kaiming_uniform_(self.weight[j], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.replicate_tiles_()

    @torch.no_grad()
    def replicate_tiles_(self) -> None:
        """With ``tile_init="replicate"``, copy the first tile's kernel and bias into every tile
        (after an initialisation that drew them all); otherwise nothing."""
        if self.tile_init != "replicate":
            return
        self.weight.copy_(self.weight[:1].expand_as(self.weight))  # (nk, cout, cin/g, kh, kw)
        if self.bias is not None:
            self.bias.copy_(self.bias[:1].expand_as(self.bias))  # (nk, cout)

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Apply the layer; ``index`` (B, nt, M) overrides the scheme's assignment."""
        if index is None:
            if self.tiles == 1 or self.scheme == "none":  # one kernel for every pixel, no draw
                return self._ordinary(x)
            if self.scheme == "random" and self.groups == 1:  # the common case, without the general checks
                out = random_native_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                           self.padding_mode, self.generator)
                if out is not None:
                    return out
            index = self.assignment(x)
            if index is None:  # perforated in evaluation
                return self._ordinary(x)
        return tiled_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                            self.scheme, self.tiles, self.training, index=index, groups=self.groups,
                            padding_mode=self.padding_mode)

    def _ordinary(self, x: Tensor) -> Tensor:
        """The plan of an ordinary convolution: ``nn.Conv2d``'s own computation with tile 0 (the
        input checked as :meth:`assignment` checks it)."""
        pads = resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        check_input(x, self.in_channels, self.kernel_size, self.stride, pads, self.dilation, self.tiles)
        check_dtype_device(x, self.weight)
        xp, padding = pad_input(x, self.padding, self.padding_mode, self.kernel_size, self.stride, self.dilation)
        return torch.nn.functional.conv2d(xp, first_tile(self.weight), first_tile(self.bias), self.stride, padding,
                                          self.dilation, self.groups)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, tiles: int, scheme: str = "random",
                    generator: torch.Generator | None = None) -> "TiledConv2d":
        """A tiled layer whose every tile is a copy of ``conv``'s kernel and bias (groups,
        padding and padding mode included); ``ValueError`` for anything but an ``nn.Conv2d``."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{type(conv).__name__} is not an nn.Conv2d: only nn.Conv2d layers can "
                             "be tiled")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, tiles, scheme, conv.weight.device,
                    conv.weight.dtype, generator, conv.groups, conv.padding_mode)
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias))
        layer.train(conv.training)
        return layer
