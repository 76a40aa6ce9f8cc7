"""Tiling schemes: which of the ``nt`` tiles computes each output pixel (SPEC §1).

Two representations, both pure functions of the grid size (and a random generator):

* a *tile map* ``s`` of shape ``(B, np)`` (``B`` is 1 for fixed schemes, the batch size
  for per-image random ones) giving the tile of every output pixel, row-major over the
  ``oh x ow`` output grid, and
* a *gather index* of shape ``(B, nt, M)`` listing for every tile the pixels it computes,
  ``M = max`` pixels per tile, padded with ``np`` (an empty slot) where a tile has fewer.

The digital layer, the analog backend and the analysis all call these functions, so they
agree on which tile computes which pixel; :func:`plan` is the one place that turns a
scheme's draw into what a convolution needs (:class:`TilePlan`: the index, the ``image_pad``
mask, whether every pixel is covered, or an ordinary convolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rapa.ops import native

SCHEMES: tuple[str, ...] = (
    "none",
    "random",
    "random_fixed",
    "alternate",
    "image_overlap",
    "image_pad",
    "perforated",
)
GRID_SCHEMES: tuple[str, ...] = ("alternate", "image_overlap", "image_pad")
# schemes whose layer holds a single kernel matrix (``tiles`` is the perforation factor)
SINGLE_KERNEL_SCHEMES: tuple[str, ...] = ("none", "perforated")


def check_scheme(scheme: str, nt: int) -> None:
    """Raise ``ValueError`` naming the value if ``scheme`` with ``nt`` tiles is not valid."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
    if isinstance(nt, bool) or not isinstance(nt, int) or nt < 1:
        raise ValueError(f"tiles={nt!r} must be an integer >= 1")
    if scheme == "none" and nt != 1:
        raise ValueError(f"tiles={nt} with scheme='none': an ordinary convolution has 1 tile")
    if scheme in GRID_SCHEMES:
        grid_side(nt, scheme)


def grid_side(nt: int, scheme: str = "alternate") -> int:
    """``q`` with ``q*q == nt`` for the grid schemes; ``ValueError`` if ``nt`` is not square."""
    q = math.isqrt(nt)
    if q * q != nt:
        raise ValueError(
            f"tiles={nt} with scheme={scheme!r}: grid schemes need a square number of "
            f"tiles (q*q, e.g. 1, 4, 9, 16)"
        )
    return q


def num_kernels(scheme: str, nt: int) -> int:
    """Number of kernel matrices the layer holds: 1 for ``none`` and ``perforated``."""
    return 1 if scheme in SINGLE_KERNEL_SCHEMES else nt


def grid_tile_map(scheme: str, nt: int, oh: int, ow: int, device: torch.device | str | None = None) -> Tensor:
    """Tile map ``(1, oh*ow)`` of a grid scheme, the SPEC's formulas with ``x`` the column.

    ``alternate``: ``(x mod q) + q*(y mod q)``; ``image_overlap``/``image_pad``:
    ``floor(q*x/w) + q*floor(q*y/h)``.
    """
    q = grid_side(nt, scheme)
    y = torch.arange(oh, device=device).view(oh, 1)  # (oh, 1)
    x = torch.arange(ow, device=device).view(1, ow)  # (1, ow)
    if scheme == "alternate":
        s = (x % q) + q * (y % q)
    elif scheme in ("image_overlap", "image_pad"):
        s = (q * x) // ow + q * ((q * y) // oh)
    else:
        raise ValueError(f"scheme={scheme!r} is not a grid scheme ({', '.join(GRID_SCHEMES)})")
    return s.reshape(1, oh * ow)  # (1, np)


def random_partition_index(
    b: int,
    np_: int,
    nt: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    canonical: bool = False,
) -> Tensor:
    """Gather index ``(b, nt, M)`` of ``b`` independent uniformly random balanced partitions.

    Every tile gets ``floor(np/nt)`` or ``ceil(np/nt)`` pixels (sizes differ by at most 1),
    which tiles get the extra pixel is random too; empty slots hold ``np``.
    ``canonical=True`` draws the permutations by sorting ``torch.rand`` keys on any device,
    so that a seeded generator always gives the same partition (``random_fixed`` layers
    save only their seed); otherwise the fastest draw for the device is used.
    """
    m = -(-np_ // nt)  # ceil(np/nt) = M
    rem = np_ - (m - 1) * nt  # tiles that get M pixels (1..nt)
    cols = _native_draw(b, np_, generator, device, canonical, nt)  # (b, nt, M), or None
    if cols is None:
        perm = _rand_perm(b, np_, generator, device, canonical)  # (b, np)
        if m * nt != np_:
            perm = torch.cat([perm, perm.new_full((b, m * nt - np_), np_)], dim=1)  # (b, M*nt)
        cols = perm.view(b, m, nt).transpose(1, 2)  # (b, nt, M): column c of the rank grid
    if rem < nt:  # give the full columns to a random set of tiles
        tau = _rand_perm(b, nt, generator, device, canonical)  # (b, nt)
        cols = cols.gather(1, tau.unsqueeze(2).expand(b, nt, m))
    return cols.contiguous()


def random_subset_index(
    b: int,
    np_: int,
    keep: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Gather index ``(b, 1, keep)`` of ``keep`` random pixels per image (perforation)."""
    return _rand_perm(b, np_, generator, device)[:, :keep].unsqueeze(1).contiguous()


def tile_map_to_index(s: Tensor, nt: int) -> Tensor:
    """Convert a tile map ``(B, np)`` to a gather index ``(B, nt, M)`` (padded with ``np``)."""
    b, np_ = s.shape
    counts = torch.zeros(b, nt, dtype=torch.long, device=s.device)
    counts.scatter_add_(1, s, torch.ones_like(s))  # (B, nt)
    m = max(int(counts.max()), 1)
    order = torch.sort(s, dim=1, stable=True).indices  # (B, np): pixels grouped by tile
    start = torch.cumsum(counts, 1) - counts  # (B, nt)
    s_sorted = s.gather(1, order)  # (B, np)
    pos = torch.arange(np_, device=s.device).expand(b, np_) - start.gather(1, s_sorted)  # (B, np)
    index = torch.full((b, nt, m), np_, dtype=torch.long, device=s.device)
    index.view(b, nt * m).scatter_(1, s_sorted * m + pos, order)
    return index


def index_to_tile_map(index: Tensor, np_: int) -> Tensor:
    """Convert a gather index ``(B, nt, M)`` to a tile map ``(B, np)``; uncovered pixels get -1."""
    b, nt, m = index.shape
    s = torch.full((b, np_ + 1), -1, dtype=torch.long, device=index.device)
    tiles = torch.arange(nt, device=index.device).view(1, nt, 1).expand(b, nt, m)
    s.scatter_(1, index.reshape(b, nt * m), tiles.reshape(b, nt * m))
    return s[:, :np_]


def assignment_index(
    scheme: str,
    nt: int,
    b: int,
    oh: int,
    ow: int,
    training: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    fixed_seed: int | None = None,
) -> Tensor | None:
    """Gather index ``(1 or b, nt', M)`` for one forward pass, or ``None`` for a plain conv.

    ``nt'`` is ``nt`` except for ``perforated`` (1). ``None`` means every pixel uses the
    single kernel (``none``, one tile, ``perforated`` in evaluation). ``random_fixed``
    needs ``fixed_seed``: its partition is a function of that seed and the grid size only.
    """
    np_ = oh * ow
    if scheme == "none" or nt == 1:
        return None
    if scheme == "perforated":
        if not training:
            return None
        return random_subset_index(b, np_, -(-np_ // nt), generator, device)
    if scheme == "random":
        return random_partition_index(b, np_, nt, generator, device)
    if scheme == "random_fixed":
        if fixed_seed is None:
            raise ValueError("scheme='random_fixed' needs fixed_seed")
        g = torch.Generator().manual_seed(int(fixed_seed))
        return random_partition_index(1, np_, nt, g, canonical=True).to(device)
    return tile_map_to_index(grid_tile_map(scheme, nt, oh, ow, device), nt)


@dataclass(frozen=True)
class TilePlan:
    """The assignment of one forward pass, as every tiled convolution applies it."""

    index: Tensor | None
    """Gather index ``(B, nt', M)`` (value ``np``: an empty slot); ``None``: one kernel computes
    every pixel, an ordinary convolution."""
    mask: Tensor | None
    """``image_pad`` only: ``(np, kh*kw)``, 1 where a patch entry reads the output pixel's own
    region of the input, 0 where the read is cut off; ``None`` for every other scheme."""
    covered: bool
    """Every output pixel has a slot (the index partitions the pixels); ``False`` for
    ``perforated``, whose pixels without a slot are 0."""

    @property
    def plain(self) -> bool:
        """Whether this is an ordinary convolution (no index)."""
        return self.index is None


def plan(scheme: str, nt: int, index: Tensor | None, in_size: tuple[int, int], out_size: tuple[int, int],
         kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
         dilation: tuple[int, int], dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> TilePlan:
    """The :class:`TilePlan` of ``scheme`` with ``nt`` tiles for a drawn ``index`` (from
    :func:`assignment_index`, or given; ``None``: a plain convolution) on an input of
    ``in_size`` (as given, before any padding) with output grid ``out_size``; ``padding`` is
    the ``(top, left)`` padding, ``dtype`` and ``device`` the mask's (default bool, the index's)."""
    if index is None:
        return TilePlan(None, None, True)
    mask = None
    if scheme == "image_pad":  # regions of the input as given, before any padding
        mask = region_mask(nt, *in_size, *out_size, kernel_size, stride, padding, dilation,
                           index.device if device is None else device)
        if dtype is not None:
            mask = mask.to(dtype)
    return TilePlan(index, mask, scheme != "perforated")  # other schemes' indexes partition the pixels


def tile_map(
    scheme: str,
    nt: int,
    b: int,
    oh: int,
    ow: int,
    training: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    fixed_seed: int | None = None,
) -> Tensor:
    """Tile map ``(1 or b, np)`` of one forward pass (perforated: 0 kept, -1 dropped)."""
    index = assignment_index(scheme, nt, b, oh, ow, training, generator, device, fixed_seed)
    if index is None:
        return torch.zeros(1, oh * ow, dtype=torch.long, device=device)
    return index_to_tile_map(index, oh * ow)


def region_mask(nt: int, h: int, w: int, oh: int, ow: int, kernel_size: tuple[int, int],
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                device: torch.device | str | None = None) -> Tensor:
    """``image_pad`` mask ``(np, kh*kw)``: 1 where a patch entry reads an input pixel of the
    output pixel's own region (regions by the ``image_overlap`` formula on each grid).

    Entries in the zero padding are 1 (they are zero anyway).
    """
    q = grid_side(nt, "image_pad")
    kh, kw = kernel_size
    oy = torch.arange(oh, device=device).view(oh, 1, 1, 1)
    ox = torch.arange(ow, device=device).view(1, ow, 1, 1)
    ky = torch.arange(kh, device=device).view(1, 1, kh, 1)
    kx = torch.arange(kw, device=device).view(1, 1, 1, kw)
    iy = oy * stride[0] - padding[0] + ky * dilation[0]  # (oh, 1, kh, 1) input row read
    ix = ox * stride[1] - padding[1] + kx * dilation[1]  # (1, ow, 1, kw) input column read
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    same_y = (q * iy.clamp(0, h - 1)) // h == (q * oy) // oh
    same_x = (q * ix.clamp(0, w - 1)) // w == (q * ox) // ow
    return ((same_y & same_x) | ~inside).reshape(oh * ow, kh * kw)


def _native_draw(b: int, n: int, generator: torch.Generator | None, device, canonical: bool,
                 cols: int = 1) -> Tensor | None:
    """:func:`rapa.ops.native.randperm_rows` (the draws of ``b`` ``torch.randperm`` calls, as
    rows or rank grids of ``cols`` columns) where it applies: CPU, not ``canonical``, built."""
    gen_dev = torch.device("cpu") if generator is None else generator.device
    dev = gen_dev if device is None else torch.device(device)
    if dev.type != "cpu" or gen_dev.type != "cpu" or canonical:
        return None
    return native.randperm_rows(b, n, generator, cols)


def _rand_perm(b: int, n: int, generator: torch.Generator | None, device,
               canonical: bool = False) -> Tensor:
    """``b`` independent uniformly random permutations of ``range(n)``, shape ``(b, n)``.

    On the CPU ``torch.randperm``'s shuffle per row (several times faster than sorting random
    keys), all rows in one native call where the kernels build
    (:func:`rapa.ops.native.randperm_rows`: the same permutations and generator state);
    elsewhere, or when ``canonical``, the argsort of ``torch.rand`` keys.
    """
    gen_dev = torch.device("cpu") if generator is None else generator.device
    dev = gen_dev if device is None else torch.device(device)
    rows = _native_draw(b, n, generator, device, canonical)
    if rows is not None:
        return rows
    if dev.type == "cpu" and gen_dev.type == "cpu" and not canonical:
        out = torch.empty(b, n, dtype=torch.long)
        for row in out:  # rows, not patches: b calls of a compiled shuffle
            torch.randperm(n, generator=generator, out=row)
        return out
    if generator is not None and dev != gen_dev:
        keys = torch.rand(b, n, generator=generator, device=gen_dev).to(dev)
    else:
        keys = torch.rand(b, n, generator=generator, device=dev)
    return keys.argsort(dim=1)
