"""CIFAR-10 and CIFAR-100 from the python-pickle distribution (Krizhevsky 2009).

Reads either the extracted folder (``cifar-10-batches-py/data_batch_1..5, test_batch``;
``cifar-100-python/train, test``) or the ``.tar.gz`` archive directly, after checking the
md5 of each batch file or of the archive (the values torchvision uses).
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rapa.data.base import DatasetError, DatasetInfo, ImageDataset

__all__ = ["CIFAR10", "CIFAR100"]


def _get(entry: dict, key: str) -> Any:
    """``entry[key]`` for pickles with bytes keys (the original, Python 2) or str keys."""
    if key.encode() in entry:
        return entry[key.encode()]
    return entry[key]


class CIFAR10(ImageDataset):
    """CIFAR-10: 50000 train / 10000 test colour images 32x32, 10 classes."""

    info: ClassVar[DatasetInfo] = DatasetInfo(
        name="cifar10",
        num_classes=10,
        in_channels=3,
        size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        is_digits=False,
    )
    title: ClassVar[str] = "CIFAR-10"
    subdir: ClassVar[str] = "cifar10"
    homepage: ClassVar[str] = "https://www.cs.toronto.edu/~kriz/cifar.html"
    urls: ClassVar[tuple[str, ...]] = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
    filename: ClassVar[str] = "cifar-10-python.tar.gz"
    tgz_md5: ClassVar[str] = "c58f30108f718f92721af3b95e74349a"
    base_folder: ClassVar[str] = "cifar-10-batches-py"
    label_key: ClassVar[str] = "labels"
    split_files: ClassVar[dict[str, list[tuple[str, str]]]] = {
        "train": [
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ],
        "test": [("test_batch", "40351d587109b95175f43aff81a1287e")],
    }

    def _find_folder(self, split: str) -> Path | None:
        """A folder holding all batch files of ``split``: ``<dir>/<base_folder>`` or ``<dir>``."""
        names = [name for name, _ in self.split_files[split]]
        for d in self.search_dirs():
            folders = [d / self.base_folder]
            if d == self.data_dir or d.name == self.base_folder:  # the folder itself was named
                folders.append(d)
            for folder in folders:
                if all((folder / n).is_file() for n in names):
                    return folder
        return None

    def _entries_from_folder(self, folder: Path, split: str) -> list[dict]:
        entries = []
        for name, md5 in self.split_files[split]:
            path = folder / name
            self.check_md5(path, md5, self.urls[0])
            with open(path, "rb") as f:
                entries.append(pickle.load(f, encoding="bytes"))
        return entries

    def _entries_from_tar(self, archive: Path, split: str) -> list[dict]:
        self.check_md5(archive, self.tgz_md5, self.urls[0])
        wanted = {f"{self.base_folder}/{name}": i for i, (name, _) in enumerate(self.split_files[split])}
        entries: list[Any] = [None] * len(wanted)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:  # one pass: members are read in archive order
                    i = wanted.get(member.name)
                    if i is not None and member.isfile():
                        f = tar.extractfile(member)
                        assert f is not None
                        entries[i] = pickle.load(f, encoding="bytes")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"cannot read {self.title} archive {archive}: {exc}. Delete it and get it again.")
        missing = [n for n, i in wanted.items() if entries[i] is None]
        if missing:
            raise DatasetError(f"{self.title} archive {archive} lacks {missing}; delete it and get it again.")
        return entries

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 (N, 3, 32, 32) and labels int64 (N,) of ``split``."""
        self.check_split(split)
        folder = self._find_folder(split)
        archive = self.find(self.filename)
        if folder is not None:
            entries = self._entries_from_folder(folder, split)
        elif archive is not None:
            entries = self._entries_from_tar(archive, split)
        elif self.download:
            entries = self._entries_from_tar(self.fetch(self.urls, self.filename, self.tgz_md5), split)
        else:
            names = [n for n, _ in self.split_files[split]]
            files = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
            raise self.missing_error(
                split,
                f"{self.base_folder}/{files} or {self.filename}",
                f"{self.filename} (or its extracted {self.base_folder}/ folder) from {self.urls[0]}",
            )
        images = np.concatenate([np.asarray(_get(e, "data"), dtype=np.uint8) for e in entries])  # (N, 3072)
        labels = np.concatenate([np.asarray(_get(e, self.label_key), dtype=np.int64) for e in entries])  # (N,)
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{self.title} {split} batches have unexpected shapes {images.shape}, {labels.shape}")
        return images.reshape(-1, 3, 32, 32), labels  # (N, 3, 32, 32), (N,)


class CIFAR100(CIFAR10):
    """CIFAR-100: 50000 train / 10000 test colour images 32x32, 100 fine classes."""

    info: ClassVar[DatasetInfo] = DatasetInfo(
        name="cifar100",
        num_classes=100,
        in_channels=3,
        size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        is_digits=False,
    )
    title: ClassVar[str] = "CIFAR-100"
    subdir: ClassVar[str] = "cifar100"
    urls: ClassVar[tuple[str, ...]] = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)
    filename: ClassVar[str] = "cifar-100-python.tar.gz"
    tgz_md5: ClassVar[str] = "eb9058c3a382ffc7106e4002c42a8d85"
    base_folder: ClassVar[str] = "cifar-100-python"
    label_key: ClassVar[str] = "fine_labels"
    split_files: ClassVar[dict[str, list[tuple[str, str]]]] = {
        "train": [("train", "16019d7e3df5f24257cddd939b257f8d")],
        "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
    }
