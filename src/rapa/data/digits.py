"""scikit-learn's embedded handwritten digits (UCI optdigits test set): 1797 grey 8x8 images.

Always available offline, so it is the dataset of the quick demos and tests. Pixel values
0..16 are scaled to 0..255. The images are resized bilinearly to ``size x size`` (default
28, so that the paper's network, made for 32x32 and 28x28 inputs, runs on them unchanged;
``size=8`` keeps the originals). The train/test split is fixed and stratified: one third
of each class is test, chosen with ``random_state=0``.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from rapa.data.base import DatasetInfo, ImageDataset

__all__ = ["Digits", "digits_split"]

TEST_FRACTION = 1 / 3
SPLIT_SEED = 0


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of indices into (train, test), a third of each class in test."""
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    index = np.arange(labels.shape[0])
    train, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(test)


class Digits(ImageDataset):
    """sklearn digits: 1198 train / 599 test grey images, 10 classes, resized to ``size``."""

    info: ClassVar[DatasetInfo] = DatasetInfo(
        name="digits",
        num_classes=10,
        in_channels=1,
        size=28,
        mean=(0.3054,),
        std=(0.3246,),
        is_digits=True,
    )
    title: ClassVar[str] = "digits"
    subdir: ClassVar[str] = "digits"
    homepage: ClassVar[str] = "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html"

    def __init__(self, data_dir: str | os.PathLike | None = None, download: bool = False, size: int = 28) -> None:
        super().__init__(data_dir, download)
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = int(size)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 (N, 1, size, size) and labels int64 (N,) of ``split``."""
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]

        self.check_split(split)
        bunch = load_digits()
        labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
        train, test = digits_split(labels)
        index = train if split == "train" else test
        x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)[index, None] * (255.0 / 16.0))  # (N, 1, 8, 8)
        if self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)  # (N, 1, s, s)
        images = x.round().clamp(0, 255).to(torch.uint8).numpy()  # (N, 1, s, s)
        return images, labels[index]
