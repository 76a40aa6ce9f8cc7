"""rapa.data: dataset readers (on small fake files in the original formats), augmentation, loader."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rapa.data import (
    CIFAR10,
    CIFAR100,
    DATASETS,
    SVHN,
    Augment,
    BatchLoader,
    DatasetError,
    FashionMNIST,
    dataset_info,
    load_dataset,
    make_augment,
    make_loader,
    scale_crop,
)
from rapa.errors import RapaError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """Point the cache at an empty folder so that no real user data is read."""
    monkeypatch.setenv("RAPA_DATA_DIR", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------
# fake files in the original formats


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR row layout written out by hand: 1024 red, 1024 green, 1024 blue, each row-major."""
    n = images.shape[0]
    return np.concatenate([images[:, c].reshape(n, 1024) for c in range(3)], axis=1)


def write_cifar10(folder: Path, n: int = 4, seed: int = 0) -> tuple:
    """Fake cifar-10-batches-py: 5 train batches and a test batch of ``n`` images each.

    Returns (md5 by file name, train images, train labels, test images, test labels).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    md5s, train_x, train_y = {}, [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        blob = pickle.dumps({b"batch_label": name.encode(), b"labels": y, b"data": cifar_rows(x)}, protocol=2)
        (folder / name).write_bytes(blob)
        md5s[name] = md5(blob)
        if name == "test_batch":
            test_x, test_y = x, np.array(y)
        else:
            train_x.append(x)
            train_y += y
    return md5s, np.concatenate(train_x), np.array(train_y), test_x, test_y


def patch_cifar10_md5(monkeypatch, md5s: dict) -> None:
    monkeypatch.setattr(
        CIFAR10,
        "split_files",
        {
            "train": [(f"data_batch_{i}", md5s[f"data_batch_{i}"]) for i in range(1, 6)],
            "test": [("test_batch", md5s["test_batch"])],
        },
    )


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> bytes:
    """An unsigned-byte IDX file (gzipped or not); returns the uncompressed bytes."""
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    raw = magic + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return raw


def write_fashion(folder: Path, monkeypatch, n_train: int = 12, n_test: int = 5, compress: bool = True):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    resources = {}
    for stem, a in arrays.items():
        raw = write_idx(folder / (stem + ".gz" if compress else stem), a, compress)
        resources[stem] = ("0" * 32, md5(raw))
    monkeypatch.setattr(FashionMNIST, "resources", resources)
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    return arrays


def write_svhn(path: Path, n: int, monkeypatch, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[:3, 0] = [10, 1, 10]  # make sure the label 10 (digit 0) occurs
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": X, "y": y})
    url, filename, _ = SVHN.split_files[split]
    monkeypatch.setitem(SVHN.split_files, split, (url, filename, md5(path.read_bytes())))
    return X, y


# ---------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_from_extracted_folder(tmp_path, monkeypatch):
    md5s, train_x, train_y, test_x, test_y = write_cifar10(tmp_path / "cifar-10-batches-py")
    patch_cifar10_md5(monkeypatch, md5s)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.shape == (20, 3, 32, 32) and train.num_classes == 10 and train.name == "cifar10"
    assert np.array_equal(train.images.numpy(), train_x) and np.array_equal(train.labels.numpy(), train_y)
    test = load_dataset("CIFAR-10", "test", data_dir=tmp_path / "cifar-10-batches-py")  # the folder itself
    assert np.array_equal(test.images.numpy(), test_x) and np.array_equal(test.labels.numpy(), test_y)


def test_cifar10_from_tarball(tmp_path, monkeypatch):
    md5s, train_x, train_y, _, _ = write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    patch_cifar10_md5(monkeypatch, md5s)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive.read_bytes()))
    train = load_dataset("cifar10", "train", data_dir=tmp_path / "data")
    assert np.array_equal(train.images.numpy(), train_x) and np.array_equal(train.labels.numpy(), train_y)
    # a damaged archive is refused with advice
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    archive.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="corrupt.*download=True"):
        load_dataset("cifar10", "train", data_dir=tmp_path / "data")


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    files, expect = [], {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, 6).tolist()
        coarse = rng.integers(0, 20, 6).tolist()
        blob = pickle.dumps({b"data": cifar_rows(x), b"fine_labels": fine, b"coarse_labels": coarse}, protocol=2)
        (folder / split).write_bytes(blob)
        files.append((split, md5(blob)))
        expect[split] = (x, np.array(fine))
    monkeypatch.setattr(CIFAR100, "split_files", {"train": [files[0]], "test": [files[1]]})
    for split in ("train", "test"):
        data = load_dataset("cifar100", split, data_dir=tmp_path)
        assert data.num_classes == 100 and data.images.shape == (6, 3, 32, 32)
        assert np.array_equal(data.images.numpy(), expect[split][0])
        assert np.array_equal(data.labels.numpy(), expect[split][1])


def test_cifar_corrupt_batch_says_what_to_do(tmp_path, monkeypatch):
    md5s, *_ = write_cifar10(tmp_path / "cifar-10-batches-py")
    patch_cifar10_md5(monkeypatch, md5s)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    blob = bytearray(bad.read_bytes())
    blob[-10] ^= 0x01
    bad.write_bytes(bytes(blob))
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert str(bad) in msg and "corrupt" in msg and md5s["data_batch_3"] in msg and "download" in msg
    assert isinstance(info.value, RapaError)  # the CLI prints it as one line
    load_dataset("cifar10", "test", data_dir=tmp_path)  # the test batch is intact


def test_real_md5_refuses_fake_files(tmp_path):
    """Without patching, the real checksums reject files that are not the originals."""
    write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DatasetError, match="c58f30108f718f92721af3b95e74349a|40351d587109b95175f43aff81a1287e"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize(
    "name, expected_file",
    [
        ("cifar10", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python.tar.gz"),
        ("svhn", "train_32x32.mat"),
        ("fashion-mnist", "train-images-idx3-ubyte.gz"),
    ],
)
def test_missing_files_say_what_to_do(tmp_path, monkeypatch, name, expected_file):
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    data_dir = tmp_path / "nothing-here"
    with pytest.raises(DatasetError) as info:
        load_dataset(name, "train", data_dir=data_dir)
    msg = str(info.value)
    for part in (expected_file, str(data_dir), "drop --data-dir", str(tmp_path / "cache"), "download=True", "http"):
        assert part in msg, (part, msg)


def test_download_fetches_into_data_dir(tmp_path, monkeypatch):
    """download=True fetches with urllib (a file:// URL here, no network) and checks the md5."""
    X, _ = write_svhn(tmp_path / "remote" / "train_32x32.mat", 5, monkeypatch)
    _, filename, good_md5 = SVHN.split_files["train"]
    url = (tmp_path / "remote" / filename).as_uri()
    monkeypatch.setitem(SVHN.split_files, "train", (url, filename, good_md5))
    with pytest.raises(DatasetError, match="not found"):  # no download unless asked
        load_dataset("svhn", "train", data_dir=tmp_path / "dl")
    data = load_dataset("svhn", "train", data_dir=tmp_path / "dl", download=True)
    assert (tmp_path / "dl" / "svhn" / filename).is_file()
    assert np.array_equal(data.images[1, 2].numpy(), X[:, :, 2, 1])
    # a download with the wrong checksum is refused and not kept
    monkeypatch.setitem(SVHN.split_files, "train", (url, filename, "0" * 32))
    with pytest.raises(DatasetError, match="could not download.*md5"):
        load_dataset("svhn", "train", data_dir=tmp_path / "dl2", download=True)
    assert not list((tmp_path / "dl2" / "svhn").iterdir())


# ---------------------------------------------------------------------------------------
# SVHN, Fashion-MNIST


def test_svhn_layout_and_label_10_is_0(tmp_path, monkeypatch):
    X, y = write_svhn(tmp_path / "svhn" / "train_32x32.mat", 9, monkeypatch)
    data = load_dataset("svhn", "train", data_dir=tmp_path)
    assert data.images.shape == (9, 3, 32, 32) and data.images.dtype == torch.uint8
    for i in range(9):  # sample i is X[:, :, :, i], channels first
        for c in range(3):
            assert np.array_equal(data.images[i, c].numpy(), X[:, :, c, i])
    expected = [0 if v == 10 else int(v) for v in y[:, 0]]
    assert data.labels.tolist() == expected and data.labels.dtype == torch.int64
    assert data.labels[:3].tolist() == [0, 1, 0]


def test_svhn_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "test_32x32.mat"
    write_svhn(path, 4, monkeypatch, split="test")
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatasetError, match="corrupt or incomplete"):
        load_dataset("svhn", "test", data_dir=tmp_path)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, monkeypatch, compress):
    arrays = write_fashion(tmp_path, monkeypatch, compress=compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_dataset("fashion-mnist", split, data_dir=tmp_path)
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (1, 28, 28)
        assert np.array_equal(data.images[:, 0].numpy(), arrays[f"{prefix}-images-idx3-ubyte"])
        assert np.array_equal(data.labels.numpy(), arrays[f"{prefix}-labels-idx1-ubyte"])


def test_fashion_mnist_torchvision_layout_and_limit(tmp_path, monkeypatch):
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", monkeypatch)
    data = load_dataset("fashion_mnist", "train", data_dir=tmp_path, limit=5)
    assert len(data) == 5
    assert np.array_equal(data.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"][:5])


def test_fashion_mnist_corrupt(tmp_path, monkeypatch):
    write_fashion(tmp_path, monkeypatch)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[:-6])  # truncated gzip stream
    with pytest.raises(DatasetError, match="corrupt or incomplete"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    # a well-formed gzip of different content fails the content md5
    raw = bytearray(gzip.decompress(blob))
    raw[-1] ^= 0x01
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="corrupt.*download"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)


@pytest.mark.skipif(
    not (DEBIAN_FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(), reason="Debian's dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_files():
    train = load_dataset("fashion-mnist", "train")  # found in /usr/share/datasets/fashion-mnist
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    info = dataset_info("fashion-mnist")
    x = train.images.double() / 255
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(info.std[0], abs=1e-3)


# ---------------------------------------------------------------------------------------
# digits


def bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize, half-pixel centres (align_corners=False), written out pixel by pixel."""
    h, w = img.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            sy = max((i + 0.5) * h / size - 0.5, 0.0)
            sx = max((j + 0.5) * w / size - 0.5, 0.0)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            top = (1 - fx) * img[y0, x0] + fx * img[y0, x1]
            bottom = (1 - fx) * img[y1, x0] + fx * img[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ref_images = np.round(ref.images * 255 / 16).astype(np.uint8)  # (1797, 8, 8)
    train = load_dataset("digits", "train", size=8)
    test = load_dataset("digits", "test", size=8)
    assert len(train) + len(test) == 1797 and abs(len(test) - 1797 / 3) <= 1
    # stratified: each class has a third of its samples in test (up to rounding)
    for c in range(10):
        n_c = int((ref.target == c).sum())
        assert abs(int((test.labels == c).sum()) - n_c / 3) <= 1
    # disjoint and complete: the union is exactly the 1797 (image, label) pairs
    def rows(images, labels):
        flat = np.concatenate([images.reshape(len(labels), -1), np.asarray(labels)[:, None]], axis=1)
        return flat[np.lexsort(flat.T[::-1])]

    got = rows(np.concatenate([train.images.numpy(), test.images.numpy()]), np.concatenate([train.labels, test.labels]))
    assert np.array_equal(got, rows(ref_images, ref.target))
    # fixed: a second load gives the same split
    again = load_dataset("digits", "test", size=8)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_digits_default_28x28_bilinear():
    from sklearn.datasets import load_digits

    small = load_dataset("digits", "test", size=8)
    big = load_dataset("digits", "test")
    info = dataset_info("digits")
    assert big.images.shape == (len(small), 1, 28, 28) == (len(small), info.in_channels, info.size, info.size)
    assert torch.equal(big.labels, small.labels)
    ref = load_digits()
    # find the originals of the first test images and resize them by hand
    for i in range(3):
        k = int(np.flatnonzero((np.round(ref.images * 255 / 16) == small.images[i, 0].numpy()).all(axis=(1, 2)))[0])
        expected = np.round(bilinear_reference(ref.images[k] * 255 / 16, 28))
        assert np.abs(big.images[i, 0].numpy().astype(float) - expected).max() <= 1
    train = load_dataset("digits", "train").images.double() / 255
    assert train.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert train.std().item() == pytest.approx(info.std[0], abs=1e-3)


# ---------------------------------------------------------------------------------------
# registry


def test_registry_info_and_errors():
    assert set(DATASETS) == {"cifar10", "cifar100", "svhn", "fashion-mnist", "digits"}
    info = dataset_info("cifar100")
    assert (info.num_classes, info.in_channels, info.size, info.is_digits) == (100, 3, 32, False)
    assert len(info.mean) == len(info.std) == 3
    assert dataset_info("SVHN").is_digits and dataset_info("digits").is_digits
    assert not dataset_info("fashion-mnist").is_digits
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10.*digits"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="imagenet"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=-1)
    full = load_dataset("digits", "train")
    first = load_dataset("digits", "train", limit=10)
    assert torch.equal(first.images, full.images[:10]) and torch.equal(first.labels, full.labels[:10])


# ---------------------------------------------------------------------------------------
# augmentation


def batch(n=64, c=3, h=12, w=10, seed=0, dtype=torch.float32):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", ["none", "moderate", "strong"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_keeps_shape_and_dtype(kind, dtype):
    x = batch(dtype=dtype)
    y = Augment(kind, generator=torch.Generator().manual_seed(1))(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    if kind != "none":
        assert not torch.equal(y, x)


def test_augment_none_is_identity():
    x = batch()
    assert torch.equal(Augment("none")(x), x)
    assert torch.equal(Augment("moderate", mirror=False, brightness=0.0)(x), x)


def test_mirroring_flips_exactly():
    x = batch()
    y = Augment("moderate", mirror=True, brightness=0.0, generator=torch.Generator().manual_seed(2))(x)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54  # about half of 64
    # strong at scale 1 with mirroring is the exact flip too
    ones = torch.ones(len(x))
    z = scale_crop(x, ones, ones, torch.rand(len(x)), torch.rand(len(x)), torch.ones(len(x), dtype=torch.bool))
    torch.testing.assert_close(z, x.flip(-1), atol=1e-5, rtol=0)


def test_brightness_is_a_bounded_constant_shift():
    x = batch()
    y = Augment("moderate", mirror=False, brightness=0.25, generator=torch.Generator().manual_seed(3))(x)
    delta = (y - x).flatten(1)  # (N, C*H*W)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6)
    assert delta.abs().max() <= 0.25 + 1e-6 and delta[:, 0].std() > 0.05


def test_scale_crop_matches_interpolate_at_corners():
    x = batch(n=4)
    sx = torch.tensor([1.0, 1.25, 1.3, 1.1])
    sy = torch.tensor([1.0, 1.1, 1.3, 1.25])
    zero, one = torch.zeros(4), torch.ones(4)
    top_left = scale_crop(x, sx, sy, zero, zero)
    bottom_right = scale_crop(x, sx, sy, one, one)
    def zoom(img, i):  # torch's own bilinear resize by (sy, sx)
        factor = (float(sy[i]), float(sx[i]))
        return F.interpolate(
            img, scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=False
        )

    for i in range(4):
        torch.testing.assert_close(top_left[i], zoom(x[i : i + 1], i)[0, :, :12, :10], atol=1e-5, rtol=0)
        # bottom-right window == top-left window of the image turned by 180 degrees
        turned = zoom(x[i : i + 1].flip(-1, -2), i)[0, :, :12, :10].flip(-1, -2)
        torch.testing.assert_close(bottom_right[i], turned, atol=1e-5, rtol=0)


def test_strong_crop_stays_inside_the_image():
    n, h, w = 256, 16, 20
    ramp_x = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)  # value = column index
    ramp_y = torch.arange(h, dtype=torch.float32)[:, None].expand(n, 1, h, w)  # value = row index
    x = torch.cat([ramp_x, ramp_y], 1)
    y = Augment("strong", mirror=False, generator=torch.Generator().manual_seed(4))(x)
    for ch, size in ((0, w), (1, h)):
        line = y[:, ch, h // 2, :] if ch == 0 else y[:, ch, :, w // 2]  # (N, size) sample positions
        step = line[:, 2] - line[:, 1]  # 1 / scale (columns 1, 2 are never clamped)
        assert (step >= 1 / 1.3 - 1e-4).all() and (step <= 1 + 1e-4).all()
        assert step.min() < 0.85 and step.max() > 0.95  # scales spread over [1, 1.3]
        left = line[:, 1] - 1.5 * step + 0.5  # window edges, in input pixels
        right = left + size * step
        assert (left >= -1e-3).all() and (right <= size + 1e-3).all()
        assert left.max() > 1.0  # the window moves
    # a constant image stays constant: nothing from outside the image is blended in
    const = torch.full((32, 3, 8, 8), 0.7)
    out = Augment("strong", mirror=True, generator=torch.Generator().manual_seed(5))(const)
    torch.testing.assert_close(out, const, atol=1e-6, rtol=0)


def test_augment_reproducible_and_defaults():
    x = batch()
    for kind in ("moderate", "strong"):
        a = Augment(kind, generator=torch.Generator().manual_seed(7))(x)
        b = Augment(kind, generator=torch.Generator().manual_seed(7))(x)
        c = Augment(kind, generator=torch.Generator().manual_seed(8))(x)
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert make_augment("strong", "digits").mirror is False
    assert make_augment("strong", "svhn").mirror is False
    assert make_augment("strong", "cifar10").mirror is True
    assert make_augment("moderate", "fashion-mnist").mirror is True
    assert make_augment("moderate", "svhn", mirror=True).mirror is True
    with pytest.raises(ValueError, match="kind"):
        Augment("heavy")
    with pytest.raises(ValueError, match="max_scale"):
        Augment("strong", max_scale=0.9)
    with pytest.raises(ValueError, match="x must"):
        Augment("strong")(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------
# loader


def indexed_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i, its label is i."""
    idx = torch.arange(n)
    return idx.to(torch.uint8)[:, None, None, None].expand(n, 1, 4, 4).contiguous(), idx


def test_loader_covers_each_sample_once_per_epoch():
    images, labels = indexed_images(103)
    loader = BatchLoader(images, labels, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 11
    epochs = []
    for _ in range(2):
        ys = []
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 4, 4)
            assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)  # image and label travel together
            ys.append(y)
        order = torch.cat(ys)
        assert sorted(order.tolist()) == list(range(103))
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    assert not torch.equal(epochs[0], torch.arange(103))
    dropped = BatchLoader(images, labels, 10, shuffle=True, drop_last=True)
    assert len(dropped) == 10
    ys = torch.cat([y for _, y in dropped])
    assert len(ys) == 100 and len(set(ys.tolist())) == 100
    plain = BatchLoader(images, labels, 25)
    assert len(plain) == 5 and torch.equal(torch.cat([y for _, y in plain]), labels)


def test_loader_normalises_per_channel():
    rng = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (7, 3, 5, 5), generator=rng, dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x, y = next(iter(BatchLoader(images, torch.arange(7), 7, mean=mean, std=std, device="cpu")))
    expected = (images.double() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)


def test_loader_reproducible_with_seed():
    data = load_dataset("digits", "test", limit=100)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [b for b in make_loader(data, 16, shuffle=True, augment="strong", generator=g)]

    a, b, c = run(3), run(3), run(4)
    assert len(a) == 7 and a[-1][0].shape == (4, 1, 28, 28)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_make_loader_standardises_with_dataset_stats():
    data = load_dataset("digits", "train")
    x = torch.cat([x for x, _ in make_loader(data, 256)])
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_loader_rejects_bad_arguments():
    images, labels = indexed_images(5)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(images, labels, 0)
    with pytest.raises(ValueError, match="images"):
        BatchLoader(images.float(), labels, 2)
    with pytest.raises(ValueError, match="labels"):
        BatchLoader(images, labels[:4], 2)
    with pytest.raises(ValueError, match="std"):
        BatchLoader(images, labels, 2, std=(0.0,))
    with pytest.raises(ValueError, match="mean"):
        BatchLoader(images, labels, 2, mean=(0.1, 0.2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_and_augment_on_cuda():
    images, labels = indexed_images(50)
    g = torch.Generator(device="cuda").manual_seed(0)
    aug = Augment("strong", generator=g)
    loader = BatchLoader(images, labels, 8, shuffle=True, augment=aug, device="cuda", generator=g)
    ys = []
    for x, y in loader:
        assert x.device.type == "cuda" and y.device.type == "cuda"
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)  # constant images stay constant
        ys.append(y.cpu())
    assert sorted(torch.cat(ys).tolist()) == list(range(50))
