"""What every dataset shares: metadata, the loaded split, file search, integrity, download.

A dataset reads its ORIGINAL distribution files (as torchvision does, without needing
torchvision). Files are searched, in order, in ``data_dir``, ``data_dir/<subdir>``, the
cache ``$RAPA_DATA_DIR`` (default ``~/.cache/rapa/data``) and ``<cache>/<subdir>``, plus
dataset-specific system folders. Every file is checked (md5) before it is read; a missing
or corrupt file raises :class:`DatasetError` saying what to put where. Nothing is ever
downloaded unless ``download=True``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from rapa.errors import RapaError

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "ImageData",
    "ImageDataset",
    "cache_dir",
    "md5_bytes",
    "md5_file",
]

CACHE_ENV = "RAPA_DATA_DIR"


class DatasetError(RapaError):
    """A dataset file is missing, corrupt or unreadable; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without reading any file."""

    name: str
    """Canonical name, a key of ``rapa.data.DATASETS``."""
    num_classes: int
    """Number of classes; labels are ``0 .. num_classes-1``."""
    in_channels: int
    """Image channels: 3 (colour) or 1 (grey)."""
    size: int
    """Height = width of the images in pixels (default size for ``digits``)."""
    mean: tuple[float, ...]
    """Per-channel mean of the training images, pixel values scaled to [0, 1]."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the training images, scaled to [0, 1]."""
    is_digits: bool
    """Images of digits: horizontal mirroring changes their meaning, so it is off by default."""
    splits: tuple[str, ...] = ("train", "test")
    """Splits ``load_dataset`` accepts."""

    @property
    def default_mirror(self) -> bool:
        """Whether augmentation mirrors images by default (not for digits)."""
        return not self.is_digits


@dataclass
class ImageData:
    """One whole split in memory, like a ``TensorDataset`` of ``(image, label)``."""

    images: Tensor
    """uint8 (N, C, H, W), pixel values 0..255."""
    labels: Tensor
    """int64 (N,), values in ``0 .. num_classes-1``."""
    num_classes: int
    """Number of classes of the dataset (not only those present)."""
    name: str
    """Canonical dataset name (a key of ``rapa.data.DATASETS``)."""
    split: str = "train"
    """Which split: ``train``, ``test`` (``extra`` for SVHN)."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    @property
    def in_channels(self) -> int:
        """Number of image channels C."""
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return (self.images.shape[2], self.images.shape[3])


def cache_dir() -> Path:
    """The download cache: ``$RAPA_DATA_DIR`` if set, else ``~/.cache/rapa/data``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/rapa/data").expanduser()


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_bytes(data: bytes) -> str:
    """Hex md5 of a bytes object."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class ImageDataset:
    """Base class of a dataset family: class attributes describe the distribution files.

    Subclasses set ``info``, ``title``, ``subdir``, ``homepage`` and implement
    :meth:`load`, returning numpy arrays ``images`` uint8 (N, C, H, W) and ``labels`` int64.
    """

    info: ClassVar[DatasetInfo]
    title: ClassVar[str] = ""
    """Human-readable name used in messages."""
    subdir: ClassVar[str] = ""
    """Folder below ``data_dir`` / the cache that is searched too and that downloads go to."""
    homepage: ClassVar[str] = ""
    system_dirs: ClassVar[tuple[str, ...]] = ()
    """Extra folders searched last (e.g. a Debian package's install path)."""

    def __init__(self, data_dir: str | os.PathLike | None = None, download: bool = False) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.download = bool(download)

    # -- where files live --------------------------------------------------------------

    def search_dirs(self) -> list[Path]:
        """Folders searched for the distribution files, in order, without duplicates: with a
        ``data_dir`` only that folder (and its ``subdir``), so that its files are never mixed
        with another copy; otherwise the cache, then :attr:`system_dirs`."""
        dirs: list[Path] = []
        if self.data_dir is not None:
            dirs += [self.data_dir, self.data_dir / self.subdir]
        else:
            dirs += [cache_dir(), cache_dir() / self.subdir]
            dirs += [Path(d) for d in self.system_dirs]
        unique: list[Path] = []
        for d in dirs:
            if d not in unique:
                unique.append(d)
        return unique

    def download_dir(self) -> Path:
        """Where ``download=True`` puts files: ``data_dir/<subdir>`` or ``<cache>/<subdir>``."""
        root = self.data_dir if self.data_dir is not None else cache_dir()
        return root / self.subdir

    def find(self, relpath: str) -> Path | None:
        """First existing ``dir / relpath`` over :meth:`search_dirs`, or None."""
        for d in self.search_dirs():
            p = d / relpath
            if p.is_file():
                return p
        return None

    # -- messages ------------------------------------------------------------------------

    def missing_error(self, split: str, wanted: str, get: str) -> DatasetError:
        """The error for files that are nowhere: where we looked and three ways out.

        ``wanted`` names the files looked for, ``get`` says what to download from where.
        """
        looked = ", ".join(str(d) for d in self.search_dirs())
        elsewhere = (f"or drop --data-dir to use the cache ({cache_dir()})" if self.data_dir is not None
                     else "or pass --data-dir DIR (data_dir=DIR) naming the folder that holds it")
        return DatasetError(
            f"{self.title} ({split} split) not found: looked for {wanted} in {looked}. "
            f"Download {get} (see {self.homepage}) and put it into one of these folders, {elsewhere}, "
            f"or pass --download (download=True) to fetch it into {self.download_dir()} "
            f"(set {CACHE_ENV} to change the cache)."
        )

    def corrupt_error(self, path: Path, got: str, expected: str, url: str) -> DatasetError:
        """The error for a file whose checksum is wrong."""
        return DatasetError(
            f"{self.title} file {path} is corrupt or incomplete (md5 {got}, expected {expected}). "
            f"Delete it, then get it again from {url} or pass --download (download=True) "
            f"to fetch a fresh copy into {self.download_dir()}."
        )

    def check_md5(self, path: Path, expected: str, url: str) -> None:
        """Raise :meth:`corrupt_error` unless the file's md5 is ``expected``."""
        got = md5_file(path)
        if got != expected:
            raise self.corrupt_error(path, got, expected, url)

    # -- download --------------------------------------------------------------------------

    def fetch(self, urls: str | Sequence[str], filename: str, md5: str | None) -> Path:
        """Download ``filename`` into :meth:`download_dir` (first URL that works), check its md5.

        The file is written to ``<name>.part`` and renamed only when complete and correct.
        """
        urls = [urls] if isinstance(urls, str) else list(urls)
        dest_dir = self.download_dir()
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / filename
        part = dest.with_name(filename + ".part")
        errors = []
        for url in urls:
            try:
                print(f"rapa: downloading {url} -> {dest}", flush=True)
                with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
                    shutil.copyfileobj(r, f, length=1 << 20)
            except OSError as exc:  # URLError and HTTPError are OSErrors
                errors.append(f"{url}: {exc}")
                part.unlink(missing_ok=True)
                continue
            if md5 is not None and (got := md5_file(part)) != md5:
                errors.append(f"{url}: md5 {got}, expected {md5}")
                part.unlink(missing_ok=True)
                continue
            part.replace(dest)
            return dest
        raise DatasetError(
            f"could not download {self.title} file {filename} ({'; '.join(errors)}). "
            f"Download it by hand (see {self.homepage}) and put it into {dest_dir}, "
            f"or pass --data-dir DIR (data_dir=DIR) naming the folder that holds it."
        )

    # -- loading -------------------------------------------------------------------------

    def check_split(self, split: str) -> None:
        """Reject a split this dataset does not have."""
        if split not in self.info.splits:
            raise ValueError(f"split must be one of {list(self.info.splits)} for {self.info.name}, got {split!r}")

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Read one split: images uint8 (N, C, H, W) and labels int64 (N,)."""
        raise NotImplementedError
