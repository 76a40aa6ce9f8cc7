"""SVHN, the cropped-digits format (Netzer et al. 2011): ``train_32x32.mat`` / ``test_32x32.mat``.

Each ``.mat`` file holds ``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1) with labels 1..10,
where 10 stands for the digit 0; we return labels 0..9 (10 -> 0).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from rapa.data.base import DatasetError, DatasetInfo, ImageDataset

__all__ = ["SVHN"]


class SVHN(ImageDataset):
    """SVHN cropped digits: 73257 train / 26032 test (531131 extra) colour images 32x32."""

    info: ClassVar[DatasetInfo] = DatasetInfo(
        name="svhn",
        num_classes=10,
        in_channels=3,
        size=32,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        is_digits=True,
        splits=("train", "test", "extra"),
    )
    title: ClassVar[str] = "SVHN"
    subdir: ClassVar[str] = "svhn"
    homepage: ClassVar[str] = "http://ufldl.stanford.edu/housenumbers/"
    split_files: ClassVar[dict[str, tuple[str, str, str]]] = {
        # split: (url, filename, md5)
        "train": (
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "train_32x32.mat",
            "e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        "test": (
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "test_32x32.mat",
            "eb5a983be6a315427106f1b164d9cef3",
        ),
        "extra": (
            "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
            "extra_32x32.mat",
            "a93ce644f1a588dc4d68dda5feec44a7",
        ),
    }

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 (N, 3, 32, 32) and labels int64 (N,) in 0..9 of ``split``."""
        import scipy.io  # type: ignore[import-untyped]  # imported here: only SVHN needs it

        self.check_split(split)
        url, filename, md5 = self.split_files[split]
        path = self.find(filename)
        if path is None:
            if not self.download:
                raise self.missing_error(split, filename, f"{filename} from {url}")
            path = self.fetch(url, filename, md5)
        self.check_md5(path, md5, url)
        try:
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        except (ValueError, OSError, NotImplementedError) as exc:
            raise DatasetError(f"cannot read SVHN file {path}: {exc}. Delete it and get it again from {url}.")
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])  # (32, 32, 3, N), (N, 1)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
            raise DatasetError(f"SVHN file {path} has unexpected shapes X {x.shape}, y {y.shape}")
        images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)  # (N, 3, 32, 32)
        labels = y.reshape(-1).astype(np.int64) % 10  # (N,), 10 -> 0
        return images, labels
