"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, gzipped or not.

Without a ``data_dir`` also searched in ``/usr/share/datasets/fashion-mnist``, where Debian's
``dataset-fashion-mnist`` package installs the four ``.gz`` files (a ``data_dir`` is the only
place searched, so that its files are never mixed with Debian's). Debian recompresses
them, so the ``.gz`` md5 differs from upstream's; the integrity check is therefore the md5
of the *decompressed* IDX content (the upstream values, the same for every copy), plus the
gzip CRC and the IDX header and length.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from rapa.data.base import DatasetError, DatasetInfo, ImageDataset, md5_bytes

__all__ = ["FashionMNIST", "read_idx"]

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse an (uncompressed) IDX file: magic ``0 0 type ndim``, ndim big-endian int32 sizes, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{source} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">i4"))
    if len(dims) != ndim or len(data) != header + int(np.prod(dims)):
        raise DatasetError(f"{source} is truncated or too long: {len(data)} bytes for dims {dims}")
    return np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=header).reshape(dims)


class FashionMNIST(ImageDataset):
    """Fashion-MNIST: 60000 train / 10000 test grey images 28x28, 10 classes of clothing."""

    info: ClassVar[DatasetInfo] = DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        in_channels=1,
        size=28,
        mean=(0.2860,),
        std=(0.3530,),
        is_digits=False,
    )
    title: ClassVar[str] = "Fashion-MNIST"
    subdir: ClassVar[str] = "fashion-mnist"
    homepage: ClassVar[str] = "https://github.com/zalandoresearch/fashion-mnist"
    system_dirs: ClassVar[tuple[str, ...]] = ("/usr/share/datasets/fashion-mnist",)
    mirrors: ClassVar[tuple[str, ...]] = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    # file stem: (md5 of the upstream .gz, md5 of the decompressed IDX content)
    resources: ClassVar[dict[str, tuple[str, str]]] = {
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    }
    split_files: ClassVar[dict[str, tuple[str, str]]] = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def search_dirs(self) -> list[Path]:
        """The usual folders, plus torchvision's layout ``<data_dir>/FashionMNIST/raw``."""
        dirs = super().search_dirs()
        if self.data_dir is not None:
            dirs.insert(2, self.data_dir / "FashionMNIST" / "raw")
        return dirs

    def _locate(self, stem: str) -> Path | None:
        """``stem.gz`` or ``stem`` in the first search folder that has either."""
        for d in self.search_dirs():
            for p in (d / f"{stem}.gz", d / stem):
                if p.is_file():
                    return p
        return None

    def _read(self, path: Path, stem: str) -> np.ndarray:
        """Decompress if gzipped, check the content md5, parse the IDX array."""
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as exc:  # bad CRC, truncated stream
                raise DatasetError(
                    f"{self.title} file {path} is corrupt or incomplete ({exc}). Delete it, then get it "
                    f"again from {self.mirrors[0]}{stem}.gz or pass --download (download=True)."
                )
        expected = self.resources[stem][1]
        got = md5_bytes(raw)
        if got != expected:
            url = f"{self.mirrors[0]}{stem}.gz"
            raise self.corrupt_error(path, f"{got} of the decompressed content", expected, url)
        return read_idx(raw, str(path))

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 (N, 1, 28, 28) and labels int64 (N,) of ``split``."""
        self.check_split(split)
        arrays = []
        for stem in self.split_files[split]:
            path = self._locate(stem)
            if path is None:
                if not self.download:
                    names = " and ".join(f"{s}.gz" for s in self.split_files[split])
                    raise self.missing_error(split, names, f"{names} from {self.mirrors[0]}")
                path = self.fetch([m + f"{stem}.gz" for m in self.mirrors], f"{stem}.gz", self.resources[stem][0])
            arrays.append(self._read(path, stem))
        images, labels = arrays
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{self.title} {split} files have unexpected shapes {images.shape}, {labels.shape}")
        return images[:, None].copy(), labels.astype(np.int64)  # (N, 1, 28, 28), (N,)
