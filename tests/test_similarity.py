"""Filter similarity across tiles (SPEC §4, Fig. 6) against numpy.corrcoef and known cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rapa.analysis.similarity import filter_grid, filter_similarity, plot_filters, tile_correlation
from rapa.cli import main
from rapa.errors import RapaError
from rapa.models import ConvNet
from rapa.tiled_conv import TiledConv2d


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(tiles=(4, 4, 1), channels=(6, 5, 4), in_channels=3, seed=0) -> ConvNet:
    return ConvNet(num_classes=3, in_channels=in_channels, channels=channels, tiles=tiles, image_size=8,
                   generator=torch.Generator().manual_seed(seed))


def test_two_tiles_match_corrcoef():
    torch.manual_seed(1)
    layer = TiledConv2d(3, 5, 3, tiles=2)
    w = layer.weight.detach().numpy()
    expected = [np.corrcoef(w[0, c].ravel(), w[1, c].ravel())[0, 1] for c in range(5)]
    np.testing.assert_allclose(tile_correlation(layer.weight).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_model_similarity_matches_slow_reference(corrcoef_similarity):
    net = _net()
    with torch.no_grad():  # make the tiles partly similar so the figure is not near 0
        for layer in net.convs[:2]:
            layer.weight.add_(3 * layer.weight[:1].clone())
    res = filter_similarity(net)
    assert set(res["layers"]) == {"conv1", "conv2"}  # conv3 has one tile: not a tiled layer
    for name in ("conv1", "conv2"):
        w = getattr(net, name).weight.detach().numpy()
        assert res["layers"][name]["similarity"] == pytest.approx(corrcoef_similarity(w), abs=1e-9)
        assert res["layers"][name]["tiles"] == 4
        assert len(res["layers"][name]["per_channel"]) == w.shape[1]
    assert res["overall"] == pytest.approx(np.mean([res["layers"][n]["similarity"] for n in ("conv1", "conv2")]))


def test_identical_tiles_give_one():
    net = _net(tiles=(4, 4, 4))
    with torch.no_grad():
        for layer in net.convs:
            layer.weight.copy_(layer.weight[:1].expand_as(layer.weight))
    res = filter_similarity(net)
    assert res["overall"] == pytest.approx(1.0, abs=1e-9)
    assert all(v["similarity"] == pytest.approx(1.0, abs=1e-9) for v in res["layers"].values())


def test_scaled_and_shifted_filters_still_correlate_one():
    w = torch.randn(1, 3, 2, 3, 3).repeat(3, 1, 1, 1, 1)
    w[1] = 2.5 * w[1] + 0.7  # Pearson: invariant to scale and offset
    w[2] = -w[2]  # anti-correlated
    # pairs (0,1): 1, (0,2): -1, (1,2): -1 -> mean -1/3
    np.testing.assert_allclose(tile_correlation(w).numpy(), [-1 / 3] * 3, atol=1e-6)


def test_independent_random_tiles_about_zero():
    torch.manual_seed(0)
    layer = TiledConv2d(3, 32, 5, tiles=16)  # independent draws per tile
    s = float(tile_correlation(layer.weight).mean())
    assert abs(s) < 0.1


def test_constant_filter_pairs_are_skipped(corrcoef_similarity):
    w = torch.randn(3, 2, 1, 2, 2)
    w[2, 0] = 1.0  # constant: no correlation defined
    got = tile_correlation(w)
    a, b = w[0, 0].flatten().numpy(), w[1, 0].flatten().numpy()
    assert float(got[0]) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-6)
    assert float(got[1]) == pytest.approx(corrcoef_similarity(w[:, 1:2].numpy()), abs=1e-6)


def test_no_tiled_layer_is_an_error():
    with pytest.raises(RapaError, match="model has no tiled layer"):
        filter_similarity(_net(tiles=None))
    with pytest.raises(RapaError, match="model has no tiled layer"):
        filter_similarity(ConvNet(in_channels=1, channels=(4, 4, 4), tiles=(4, 4, 1), scheme="perforated",
                                  image_size=8))


def test_filter_grid_and_png(tmp_path):
    net = _net(tiles=(4, 4, 1), channels=(6, 5, 4))
    with torch.no_grad():
        net.conv1.weight[1:] = net.conv1.weight[:1]
    grid = filter_grid(net.conv1.weight, n_filters=3, max_tiles=2)
    assert grid.shape == (2, 3, 5, 5, 3)  # rows = tiles, columns = filters, RGB for cin = 3
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    assert torch.equal(grid[0], grid[1])  # identical tiles look identical
    grey = filter_grid(_net(in_channels=1).conv1.weight, n_filters=2)
    assert grey.shape == (4, 2, 5, 5, 3)
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 1], grey[..., 2])
    plot_filters(net.conv1.weight, tmp_path / "f.png", n_filters=4)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_similarity(digits_runs, tmp_path, capsys, corrcoef_similarity):
    assert main(["similarity", str(digits_runs / "tiled"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "overall" in out
    res = json.loads((tmp_path / "similarity.json").read_text())
    from rapa.train import load_run

    model, _, _ = load_run(digits_runs / "tiled")
    assert res["overall"] == pytest.approx(np.mean([corrcoef_similarity(model.conv1.weight.detach().numpy()),
                                                    corrcoef_similarity(model.conv2.weight.detach().numpy())]))
    assert (tmp_path / "filters.png").stat().st_size > 0


def test_cli_similarity_errors(digits_runs, tmp_path, capsys):
    assert main(["similarity", str(digits_runs / "base"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model has no tiled layer" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["similarity", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    bad = tmp_path / "old"
    bad.mkdir()
    cfg = json.loads((digits_runs / "tiled" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "version": 999}))
    assert main(["similarity", str(bad)]) == 2
    assert "version" in capsys.readouterr().err
