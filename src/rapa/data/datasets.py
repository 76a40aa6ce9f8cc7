"""The dataset registry and the one entry point, :func:`load_dataset`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from rapa.data.base import DatasetInfo, ImageData, ImageDataset
from rapa.data.cifar import CIFAR10, CIFAR100
from rapa.data.digits import Digits
from rapa.data.fashion_mnist import FashionMNIST
from rapa.data.svhn import SVHN

__all__ = ["DATASETS", "canonical_name", "dataset_info", "load_dataset"]

DATASETS: dict[str, type[ImageDataset]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "svhn": SVHN,
    "fashion-mnist": FashionMNIST,
    "digits": Digits,
}
"""Dataset name -> class. Names are lower case; see :func:`canonical_name` for aliases."""

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
}


class UnknownDatasetError(ValueError):
    """A dataset name that is not in :data:`DATASETS`."""


def canonical_name(name: str) -> str:
    """The :data:`DATASETS` key for ``name`` (case-insensitive; ``_`` reads as ``-``).

    Raises ValueError naming ``name`` and listing the choices when it is unknown.
    """
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Static facts of dataset ``name`` (classes, channels, size, mean, std, is_digits), no I/O."""
    return DATASETS[canonical_name(name)].info


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    limit: int | None = None,
    **options: Any,
) -> ImageData:
    """Load one whole split of dataset ``name`` as uint8 images (N, C, H, W) and int64 labels.

    Args:
        name: a key of :data:`DATASETS` (``cifar10``, ``cifar100``, ``svhn``,
            ``fashion-mnist``, ``digits``).
        split: ``train`` or ``test`` (SVHN also ``extra``).
        data_dir: folder searched first for the original distribution files.
        download: fetch missing files (into ``data_dir`` or the cache ``$RAPA_DATA_DIR``,
            default ``~/.cache/rapa/data``); never done otherwise.
        limit: keep only the first ``limit`` samples (no stratification).
        options: passed to the dataset class, e.g. ``size=8`` for ``digits``.

    Raises:
        ValueError: unknown name, split or limit.
        rapa.data.DatasetError: files missing or corrupt (the message says what to do).
    """
    key = canonical_name(name)
    if limit is not None and (int(limit) != limit or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    dataset = DATASETS[key](data_dir=data_dir, download=download, **options)
    images, labels = dataset.load(split)  # (N, C, H, W) uint8, (N,) int64
    if limit is not None:
        images, labels = images[: int(limit)], labels[: int(limit)]
    return ImageData(
        images=torch.from_numpy(np.require(images, requirements=["C", "W"])),
        labels=torch.from_numpy(labels.astype("int64", copy=False)),
        num_classes=dataset.info.num_classes,
        name=key,
        split=split,
    )
