"""Batched data augmentation (paper §2.2, SPEC §3): whole batches on their own device.

Kinds:

- ``none``: identity.
- ``moderate``: random horizontal mirroring (p = 1/2 per image) and a random brightness
  change: one value ``U(-brightness, brightness)`` added to every pixel of an image. The
  input is a *normalised* batch, so the change is in units of the channel std
  (default ``brightness=0.25``).
- ``strong``: random scaling up to ``max_scale`` (130%) with scale jitter, cropped back to
  the original size at a random position, plus random mirroring. Per image a scale
  ``s ~ U(1, max_scale)`` and an aspect jitter ``a ~ U(-jitter, jitter)`` give
  ``sx = clip(s (1 + a), 1, max_scale)``, ``sy = clip(s (1 - a), 1, max_scale)``; the crop
  window (``W/sx`` by ``H/sy`` input pixels) lies wholly inside the image. One
  ``affine_grid`` + ``grid_sample`` (bilinear) call does the whole batch.

Mirroring is off by default for digit datasets (``digits``, ``svhn``), where a mirrored
digit is a different or no digit; :func:`make_augment` picks that default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rapa.data.datasets import dataset_info

__all__ = ["KINDS", "Augment", "hflip", "make_augment", "scale_crop", "shift_brightness"]

KINDS: tuple[str, ...] = ("none", "moderate", "strong")


def hflip(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right the images of ``x`` (N, C, H, W) where ``flip`` (N,) bool is True."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)  # (N, C, H, W)


def shift_brightness(x: Tensor, delta: Tensor) -> Tensor:
    """Add ``delta[i]`` (N,) to every pixel of image ``i`` of ``x`` (N, C, H, W)."""
    return x + delta.to(device=x.device, dtype=x.dtype)[:, None, None, None]  # (N, C, H, W)


def scale_crop(
    x: Tensor, sx: Tensor, sy: Tensor, ox: Tensor, oy: Tensor, flip: Tensor | None = None
) -> Tensor:
    """Zoom each image by ``(sx, sy)`` >= 1 and crop it back to (H, W).

    The crop window covers ``W/sx`` by ``H/sy`` input pixels; ``ox``, ``oy`` in [0, 1] place
    it from the left/top edge (0) to the right/bottom edge (1), always inside the image.
    Sampling is bilinear with ``align_corners=False``: at ``ox = oy = 0`` the result is the
    top-left (H, W) crop of ``F.interpolate(x, scale_factor=(sy, sx), mode="bilinear")``.
    ``flip`` (N,) bool mirrors the cropped image left-right. All arguments are (N,) tensors.
    """
    n, dev, dt = x.shape[0], x.device, x.dtype
    ax, ay = 1.0 / sx.to(dev, dt), 1.0 / sy.to(dev, dt)  # (N,) window size / image size
    tx = (2.0 * ox.to(dev, dt) - 1.0) * (1.0 - ax)  # (N,) window centre, in [-1, 1] coordinates
    ty = (2.0 * oy.to(dev, dt) - 1.0) * (1.0 - ay)  # (N,)
    if flip is not None:
        ax = torch.where(flip.to(dev), -ax, ax)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)  # (N, 2, 3) output -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = ax, tx
    theta[:, 1, 1], theta[:, 1, 2] = ay, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (N, C, H, W)


class Augment:
    """Random augmentation of a normalised float batch (N, C, H, W) -> same shape and dtype.

    Args:
        kind: ``none``, ``moderate`` or ``strong`` (see the module docstring).
        mirror: random horizontal mirroring on or off.
        brightness: half-width of the brightness change of ``moderate``, in std units.
        max_scale: largest zoom factor of ``strong`` (1.3 = 130%).
        jitter: half-width of the aspect jitter of ``strong``.
        generator: random generator; its device may differ from the batch's (the few
            random numbers per image are moved). Same generator state -> same output.
    """

    def __init__(
        self,
        kind: str = "none",
        mirror: bool = True,
        brightness: float = 0.25,
        max_scale: float = 1.3,
        jitter: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if not brightness >= 0:
            raise ValueError(f"brightness must be >= 0, got {brightness!r}")
        if not max_scale >= 1:
            raise ValueError(f"max_scale must be >= 1, got {max_scale!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.kind = kind
        self.mirror = bool(mirror)
        self.brightness = float(brightness)
        self.max_scale = float(max_scale)
        self.jitter = float(jitter)
        self.generator = generator

    def _uniform(self, n: int, k: int, device: torch.device) -> Tensor:
        """(n, k) uniform [0, 1) numbers from ``generator``, on ``device``."""
        g = self.generator
        src = g.device if g is not None else device
        return torch.rand(n, k, generator=g, device=src).to(device)  # (n, k)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float batch (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if self.kind == "none":
            return x
        n = x.shape[0]
        u = self._uniform(n, 5, x.device)  # (N, 5): flip, brightness/scale, jitter, ox, oy
        flip = u[:, 0] < 0.5  # (N,)
        if self.kind == "moderate":
            if self.mirror:
                x = hflip(x, flip)
            return shift_brightness(x, (2.0 * u[:, 1] - 1.0) * self.brightness)
        s = 1.0 + (self.max_scale - 1.0) * u[:, 1]  # (N,) in [1, max_scale]
        a = self.jitter * (2.0 * u[:, 2] - 1.0)  # (N,) in [-jitter, jitter]
        sx = (s * (1.0 + a)).clamp(1.0, self.max_scale)  # (N,)
        sy = (s * (1.0 - a)).clamp(1.0, self.max_scale)  # (N,)
        return scale_crop(x, sx, sy, u[:, 3], u[:, 4], flip if self.mirror else None)

    def __repr__(self) -> str:
        return (
            f"Augment(kind={self.kind!r}, mirror={self.mirror}, brightness={self.brightness}, "
            f"max_scale={self.max_scale}, jitter={self.jitter})"
        )


def make_augment(
    kind: str,
    dataset_name: str,
    mirror: bool | None = None,
    generator: torch.Generator | None = None,
    **kwargs: float,
) -> Augment:
    """An :class:`Augment` for ``dataset_name``; ``mirror=None`` takes the dataset's default
    (off for ``digits`` and ``svhn``, on otherwise). ``kwargs`` go to :class:`Augment`."""

    if mirror is None:
        mirror = dataset_info(dataset_name).default_mirror
    return Augment(kind, mirror=mirror, generator=generator, **kwargs)
