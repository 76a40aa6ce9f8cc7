"""Reduction to one kernel per layer (SPEC §4, Table 3) against hand-made weights and slow counts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rapa.analysis.reduce import METHODS, choose_tiles, maxpool_win_counts, reduce
from rapa.cli import main
from rapa.errors import RapaError
from rapa.models import ConvNet


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(tiles=(4, 4, 2), scheme="random", pooling="max", channels=(4, 5, 3), seed=0) -> ConvNet:
    g = torch.Generator().manual_seed(seed)
    net = ConvNet(num_classes=4, in_channels=2, channels=channels, tiles=tiles, scheme=scheme, pooling=pooling,
                  image_size=8, generator=g)
    with torch.no_grad():  # weights large enough for the activations to matter
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def _identical(net: ConvNet) -> ConvNet:
    with torch.no_grad():
        for layer in net.convs:
            layer.weight.copy_(layer.weight[:1].expand_as(layer.weight))
            layer.bias.copy_(layer.bias[:1].expand_as(layer.bias))
    return net


@pytest.mark.parametrize("pooling", ["max", "mixed"])
@pytest.mark.parametrize("method", METHODS)
def test_identical_tiles_change_no_prediction(method, pooling):
    net = _identical(_net(pooling=pooling))
    x = torch.randn(6, 2, 8, 8)
    reduced = reduce(net, method, data=x[:3], generator=torch.Generator().manual_seed(1))
    assert reduced.scheme == "none" and reduced.tiles == (1, 1, 1)
    assert reduced.pooling == pooling and reduced.channels == net.channels
    assert all(layer.num_kernels == 1 for layer in reduced.convs)
    with torch.no_grad():  # with identical tiles the tiled net is an ordinary convnet (SPEC §1)
        ref = net(x)
        got = reduced(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_norm_picks_largest_filter_and_its_bias():
    net = _net()
    scale = torch.tensor([[1.0, 5.0, 1.0, 1.0, 0.1],  # tile 0
                          [2.0, 1.0, 1.0, 0.5, 0.1],  # tile 1
                          [1.0, 1.0, 3.0, 1.0, 0.1],  # tile 2
                          [0.5, 1.0, 1.0, 4.0, 7.0]])  # tile 3
    base = torch.randn(5, 4, 5, 5)
    base = base / base.flatten(1).norm(dim=1).view(5, 1, 1, 1)  # unit-norm filters
    with torch.no_grad():
        net.conv2.weight.copy_(scale.view(4, 5, 1, 1, 1) * base)  # (nk, cout, cin, kh, kw)
    expected = [1, 0, 2, 3, 3]  # the largest scale per channel (column)
    assert choose_tiles(net.conv2, "norm").tolist() == expected
    reduced = reduce(net, "norm")
    for c, t in enumerate(expected):
        assert torch.equal(reduced.conv2.weight[0, c], net.conv2.weight[t, c])
        assert torch.equal(reduced.conv2.bias[0, c], net.conv2.bias[t, c])
    assert torch.equal(reduced.fc.weight, net.fc.weight)  # the rest is copied


def test_first_random_tile_and_random_filters():
    net = _net()
    first = reduce(net, "first_tile")
    for a, b in zip(first.convs, net.convs):
        assert torch.equal(a.weight[0], b.weight[0]) and torch.equal(a.bias[0], b.bias[0])
    rt = reduce(net, "random_tile", generator=torch.Generator().manual_seed(3))
    for a, b in zip(rt.convs, net.convs):  # the whole layer from one tile
        assert any(torch.equal(a.weight[0], b.weight[t]) and torch.equal(a.bias[0], b.bias[t])
                   for t in range(b.num_kernels))
    seen = set()
    for seed in range(6):
        rf = reduce(net, "random_filters", generator=torch.Generator().manual_seed(seed))
        for a, b in zip(rf.convs, net.convs):
            for c in range(b.out_channels):  # every channel's filter and bias from the same tile
                tiles = [t for t in range(b.num_kernels)
                         if torch.equal(a.weight[0, c], b.weight[t, c]) and torch.equal(a.bias[0, c], b.bias[t, c])]
                assert len(tiles) == 1
                seen.add(tiles[0])
    assert seen == {0, 1, 2, 3}
    r1 = reduce(net, "random_filters", generator=torch.Generator().manual_seed(9))
    r2 = reduce(net, "random_filters", generator=torch.Generator().manual_seed(9))
    assert torch.equal(r1.conv1.weight, r2.conv1.weight)  # reproducible with a seeded generator


def test_maxpool_winner_when_one_tile_always_wins():
    net = _net(tiles=(4, 4, 1))
    with torch.no_grad():
        w, b = net.conv1.weight, net.conv1.bias
        w.copy_(-w.abs())  # positive inputs: every tile's output is negative ...
        w[0] *= 20  # ... tile 0 has the largest norm (norm would pick it) ...
        b.fill_(-1.0)
        w[2] = 0.01 * w[2].abs()  # ... but only tile 2 is ever positive after the ReLU
        b[2] = 1.0
    x = torch.rand(8, 2, 8, 8)  # positive inputs
    counts = maxpool_win_counts(net, x, batch_size=3)
    assert counts[2] is None  # conv3 is followed by average pooling
    c1 = counts[0]
    assert c1.shape == (4, 4)
    assert bool((c1[:, [0, 1, 3]] == 0).all()) and bool((c1[:, 2] > 0).all())
    assert choose_tiles(net.conv1, "norm").tolist() == [0, 0, 0, 0]
    reduced = reduce(net, "maxpool_winner", data=x)
    assert torch.equal(reduced.conv1.weight[0], net.conv1.weight[2])
    assert torch.equal(reduced.conv1.bias[0], net.conv1.bias[2])
    assert torch.equal(reduced.conv3.weight[0], net.conv3.weight[0])  # one tile there


@torch.no_grad()
def _slow_conv1_counts(net: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """Loops over images, channels and pooling regions; the alternate scheme's tile formula."""
    conv = net.conv1
    nk, cout = conv.weight.shape[:2]
    q = int(nk ** 0.5)
    outs = torch.stack([F.conv2d(x, conv.weight[t], conv.bias[t], padding=2) for t in range(nk)])
    _, n, _, h, w = outs.shape
    tile = torch.tensor([[(xx % q) + q * (yy % q) for xx in range(w)] for yy in range(h)])
    counts = torch.zeros(cout, nk, dtype=torch.long)
    for i in range(n):
        for c in range(cout):
            a = torch.stack([outs[tile[yy, xx], i, c, yy, xx] for yy in range(h) for xx in range(w)]).view(h, w).relu()
            for py in range((h + 1) // 2):
                for px in range((w + 1) // 2):
                    ys = range(max(0, 2 * py - 1), min(h, 2 * py + 2))
                    xs = range(max(0, 2 * px - 1), min(w, 2 * px + 2))
                    cells = [(float(a[yy, xx]), yy, xx) for yy in ys for xx in xs]
                    best = max(cells)
                    if best[0] > 0:
                        counts[c, tile[best[1], best[2]]] += 1
    return counts


def test_maxpool_counts_match_slow_reference():
    net = _net(tiles=(4, 4, 1), scheme="alternate")
    x = torch.randn(3, 2, 8, 8)
    counts = maxpool_win_counts(net, x, batch_size=2)
    assert torch.equal(counts[0], _slow_conv1_counts(net, x))
    assert counts[1].shape == (5, 4) and int(counts[1].sum()) > 0


def test_avg_pooling_falls_back_to_norm():
    net = _net(pooling="avg")
    x = torch.randn(2, 2, 8, 8)
    assert maxpool_win_counts(net, x) == [None, None, None]
    a, b = reduce(net, "maxpool_winner", data=x), reduce(net, "norm")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_input():
    with pytest.raises(RapaError, match="model has no tiled layer"):
        reduce(_net(tiles=None), "norm")
    with pytest.raises(ValueError, match="method='best'"):
        reduce(_net(), "best")
    with pytest.raises(ValueError, match="needs data"):
        reduce(_net(), "maxpool_winner")


def test_random_fixed_state_is_dropped():
    net = _net(scheme="random_fixed")
    reduced = reduce(net, "first_tile")
    assert reduced.conv1.fixed_seed is None
    assert all(t.device.type == "cpu" for t in reduced.state_dict().values())


def test_cli_reduce(digits_runs, tmp_path, capsys):
    assert main(["reduce", str(digits_runs / "tiled"), "--out", str(tmp_path), "--device", "cpu",
                 "--limit-train", "20"]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "reduce.json").read_text())
    assert set(res["method_error_percent"]) == set(METHODS)
    assert all(0 <= e <= 100 for e in res["method_error_percent"].values())
    assert res["best_error_percent"] == min(res["method_error_percent"].values())
    assert res["method_error_percent"][res["best_method"]] == res["best_error_percent"]
    assert res["test_images"] == 30 and res["train_images"] == 20
    assert "maxpool_winner" in out and "best" in out
    assert main(["reduce", str(digits_runs / "tiled"), "--out", str(tmp_path), "--methods", "norm,first_tile",
                 "--device", "cpu"]) == 0
    assert set(json.loads((tmp_path / "reduce.json").read_text())["method_error_percent"]) == {"norm", "first_tile"}


def test_cli_reduce_errors(digits_runs, tmp_path, capsys):
    assert main(["reduce", str(digits_runs / "base"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model has no tiled layer" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["reduce", str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["reduce", str(digits_runs / "tiled"), "--methods", "magic"]) == 2
    assert "magic" in capsys.readouterr().err
