"""A device-resident batch loader (after airbench's ``CifarLoader``).

The whole uint8 dataset is moved to ``device`` once; each batch is gathered with an index
tensor, converted to float, normalised and augmented there, in a few batched ops. No
worker processes, no per-sample Python. Given a seeded ``generator`` the sequence of
batches (order and augmentation) is reproducible.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from rapa.data.augment import make_augment
from rapa.data.base import ImageData
from rapa.data.datasets import dataset_info

__all__ = ["BatchLoader", "make_loader"]


class BatchLoader:
    """Iterate over ``(x, y)`` batches: x float (B, C, H, W) normalised, y int64 (B,).

    Args:
        images: uint8 (N, C, H, W), pixel values 0..255.
        labels: integer (N,).
        batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: new random order every epoch (``torch.randperm``), else the stored order.
        augment: callable applied to each normalised float batch, e.g. an ``Augment``.
        mean, std: per-channel (length C, or 1 for all), pixel values scaled to [0, 1];
            ``x = (images / 255 - mean) / std``.
        device: where the data is kept and batches are made (default: where ``images`` is).
        drop_last: drop the last incomplete batch.
        generator: random generator for the order (and nothing else; give the augmentation
            its own or the same one). Its device may differ from ``device``.
        dtype: floating dtype of x.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        augment: Callable[[Tensor], Tensor] | None = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        device: torch.device | str | None = None,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be integer ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        c = images.shape[1]
        mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean_t.numel() not in (1, c):
            raise ValueError(f"mean must have 1 or {c} values, got {list(mean)}")
        if std_t.numel() not in (1, c) or not bool((std_t > 0).all()):
            raise ValueError(f"std must have 1 or {c} positive values, got {list(std)}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)  # (N, C, H, W) uint8, moved once
        self.labels = labels.to(self.device, torch.int64)  # (N,)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.generator = generator
        self.dtype = dtype
        # x = u8 * scale + shift == (u8 / 255 - mean) / std
        self._scale = (1.0 / (255.0 * std_t)).expand(c).reshape(1, c, 1, 1).to(self.device, dtype)  # (1, C, 1, 1)
        self._shift = (-mean_t / std_t).expand(c).reshape(1, c, 1, 1).to(self.device, dtype)  # (1, C, 1, 1)

    @property
    def num_samples(self) -> int:
        """N, the samples in the dataset."""
        return self.images.shape[0]

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def order(self) -> Tensor:
        """This epoch's sample order (N,) on the loader's device (draws from ``generator``)."""
        n = self.num_samples
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        g = self.generator
        src = g.device if g is not None else self.device
        return torch.randperm(n, generator=g, device=src).to(self.device)  # (N,)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float (B, C, H, W), ``(images / 255 - mean) / std``."""
        return torch.addcmul(self._shift, images.to(self.dtype), self._scale)  # (B, C, H, W)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order()  # (N,)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]  # (B,)
            x = self.normalize(self.images[idx])  # (B, C, H, W)
            if self.augment is not None:
                x = self.augment(x)
            yield x, self.labels[idx]


def make_loader(
    data: ImageData,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: str = "none",
    mirror: bool | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> BatchLoader:
    """A :class:`BatchLoader` for ``data`` with its dataset's mean/std and augmentation.

    ``augment`` is a kind (``none``, ``moderate``, ``strong``); ``mirror=None`` takes the
    dataset's default. ``generator`` drives both the order and the augmentation.
    """

    info = dataset_info(data.name)
    aug = None if augment == "none" else make_augment(augment, data.name, mirror=mirror, generator=generator)
    return BatchLoader(
        data.images,
        data.labels,
        batch_size,
        shuffle=shuffle,
        augment=aug,
        mean=info.mean,
        std=info.std,
        device=device,
        drop_last=drop_last,
        generator=generator,
    )
