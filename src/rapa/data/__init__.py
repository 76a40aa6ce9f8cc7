"""Datasets, batched augmentation and a device-resident loader.

>>> from rapa.data import load_dataset, make_loader
>>> data = load_dataset("digits", "train")            # offline, 28x28 grey
>>> loader = make_loader(data, 10, shuffle=True, augment="strong")
>>> x, y = next(iter(loader))                          # (10, 1, 28, 28) float, (10,) int64

Datasets read their original distribution files (see :mod:`rapa.data.base` for where they
are searched); nothing is downloaded unless ``download=True``.
"""

from rapa.data.augment import KINDS, Augment, hflip, make_augment, scale_crop, shift_brightness
from rapa.data.base import DatasetError, DatasetInfo, ImageData, ImageDataset, cache_dir
from rapa.data.cifar import CIFAR10, CIFAR100
from rapa.data.datasets import DATASETS, canonical_name, dataset_info, load_dataset
from rapa.data.digits import Digits
from rapa.data.fashion_mnist import FashionMNIST
from rapa.data.loader import BatchLoader, make_loader
from rapa.data.svhn import SVHN

__all__ = [
    "DATASETS",
    "KINDS",
    "Augment",
    "BatchLoader",
    "CIFAR10",
    "CIFAR100",
    "DatasetError",
    "DatasetInfo",
    "Digits",
    "FashionMNIST",
    "ImageData",
    "ImageDataset",
    "SVHN",
    "cache_dir",
    "canonical_name",
    "dataset_info",
    "hflip",
    "load_dataset",
    "make_augment",
    "make_loader",
    "scale_crop",
    "shift_brightness",
]
