"""Fixtures shared by the test files."""

import itertools

import numpy as np
import pytest
import torch


def _corrcoef_similarity(weight: np.ndarray) -> float:
    """SPEC §4 written out with numpy: the mean over channels of the mean ``np.corrcoef`` over
    all pairs of tiles of ``weight`` ``(nk, cout, ...)``."""
    nk, cout = weight.shape[:2]
    per_channel = []
    for c in range(cout):
        pairs = [np.corrcoef(weight[i, c].ravel(), weight[j, c].ravel())[0, 1]
                 for i, j in itertools.combinations(range(nk), 2)]
        per_channel.append(np.mean(pairs))
    return float(np.mean(per_channel))


@pytest.fixture
def corrcoef_similarity():
    """The filter similarity of a tiled weight computed independently of rapa (numpy)."""
    return _corrcoef_similarity


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: the small ops of these tests run fastest that way on a
    busy 2-core machine, and bitwise-equal CPU results need a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory):
    """Two tiny trained runs on the embedded digits, ``<root>/tiled`` (tiles (4, 4, 1)) and
    ``<root>/base`` (untiled), for the analysis commands' tests (attack, reduce, similarity):
    one epoch, 60 training and 30 test images, a learning rate high enough to move the
    weights off their initialisation."""
    from rapa.config import TrainConfig
    from rapa.train import train

    root = tmp_path_factory.mktemp("digits_runs")
    common = dict(dataset="digits", epochs=1, limit_train=60, limit_test=30, channels=(4, 4, 4), device="cpu",
                  votes=1, lr=0.05, warmup_epochs=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(tiles=(4, 4, 1), **common), root / "tiled", progress=False)
        train(TrainConfig(tiles=None, **common), root / "base", progress=False)
    finally:
        torch.set_num_threads(before)
    return root


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    """Run a test on both CPU implementations of the tiled convolution: the native kernels
    (skipped where no C++ compiler can build them) and the pure-PyTorch path."""
    from rapa.ops import native

    if request.param == "native":
        monkeypatch.setenv(native.ENV_SWITCH, "1")
        if not native.available():
            pytest.skip(f"native kernels unavailable: {native._state.get('error')}")
    else:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    return request.param


@pytest.fixture
def torch_path(monkeypatch):
    """Force the pure-PyTorch implementation of the tiled convolution (its internals are
    what the test exercises)."""
    from rapa.ops import native

    monkeypatch.setenv(native.ENV_SWITCH, "0")
