"""The analog run-time model: paper numbers, closed forms, and the layer's actual tile sizes."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn as nn

from rapa.cli import main
from rapa.runtime import LayerCost, RuntimeReport, alexnet_convs, plot_runtime, runtime_model
from rapa.tiled_conv import TiledConv2d


def paper_net(channels=(32, 32, 64), tiles=None, scheme="random", image=32) -> nn.Module:
    """Conv 5x5 pad 2 -> ReLU -> maxpool 3/2 pad 1, three times, then a linear layer."""
    layers, cin = [], 3
    for j, c in enumerate(channels):
        conv = (nn.Conv2d(cin, c, 5, padding=2) if tiles is None
                else TiledConv2d(cin, c, 5, padding=2, tiles=tiles[j], scheme=scheme))
        layers += [conv, nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = c
    side = image
    for _ in range(3):
        side = (side + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * side * side, 10))


def test_paper_net_numbers():
    r = runtime_model(paper_net(), (3, 32, 32), tiles=(16, 4, 1))
    assert [c.np for c in r.layers] == [1024, 256, 64]  # paper §2.2
    assert [c.k for c in r.layers] == [75, 800, 800]  # 5*5*3, 5*5*32
    assert [c.cout for c in r.layers] == [32, 32, 64]
    assert [c.patches_per_tile for c in r.layers] == [64, 64, 64]
    assert [(c.forward, c.backward, c.update) for c in r.layers] == [(64, 64, 64)] * 3
    assert [c.macs for c in r.layers] == [1024 * 75 * 32, 256 * 800 * 32, 64 * 800 * 64]
    assert r.speedup_pipelined == 16.0
    assert r.speedup_sequential == pytest.approx((1024 + 256 + 64) / (3 * 64))
    assert r.load_balance == 1.0
    assert r.pipelined_cycles == 3 * 64 and r.sequential_cycles == 9 * 64
    assert r.arrays == 21
    # SPEC §2: conv weights with biases, exact
    assert r.weights == 192_704 and r.untiled_weights == 79_328


def test_balanced_equals_paper_and_tiled_layers_read_the_same():
    a = runtime_model(paper_net(), (3, 32, 32), tiles="balanced")
    b = runtime_model(paper_net(tiles=(16, 4, 1)), (3, 32, 32))  # TiledConv2d layers, no override
    assert a.tiles == b.tiles == (16, 4, 1)
    assert a.to_dict() == b.to_dict()


def test_untiled_speedup_one():
    r = runtime_model(paper_net(), (3, 32, 32))
    assert r.tiles == (1, 1, 1)
    assert r.speedup_pipelined == 1.0 and r.speedup_sequential == 1.0
    assert r.pipelined_cycles == 3 * 1024
    assert r.load_balance == pytest.approx(64 / 1024)
    assert r.weights == 79_328 and r.arrays == 3


def test_odd_size_28():
    r = runtime_model(paper_net(image=28), (3, 28, 28), tiles="balanced")
    assert [c.np for c in r.layers] == [28 * 28, 14 * 14, 7 * 7]
    assert r.tiles == (16, 4, 1)
    assert [c.patches_per_tile for c in r.layers] == [49, 49, 49]
    assert r.speedup_pipelined == 16.0 and r.load_balance == 1.0


def test_uneven_tiles_ceil():
    # hand-computed: np = (1024, 256, 64), nt = (10, 3, 2) -> ceil = (103, 86, 32)
    r = runtime_model([(1024, 75, 32), (256, 800, 32), (64, 800, 64)], tiles=(10, 3, 2))
    assert [c.patches_per_tile for c in r.layers] == [103, 86, 32]
    assert r.pipelined_cycles == 3 * 103
    assert r.speedup_pipelined == pytest.approx(1024 / 103)
    assert r.load_balance == pytest.approx(32 / 103)
    assert r.utilization == pytest.approx((103 + 86 + 32) / (3 * 103))


@pytest.mark.parametrize("np_, nt", [(1024, 16), (49, 4), (196, 5)])
def test_patches_per_tile_match_the_layer(np_, nt):
    """The model's ceil(np/nt) is the largest tile of the layer's actual random assignment."""
    side = math.isqrt(np_)
    assert side * side == np_
    layer = TiledConv2d(2, 3, 3, padding=1, tiles=nt, scheme="random")
    tile_map = layer.tile_map(torch.zeros(4, 2, side, side))  # (4, np)
    counts = torch.stack([torch.bincount(t, minlength=nt) for t in tile_map])
    report = runtime_model(nn.Sequential(layer), (2, side, side))
    assert report.layers[0].patches_per_tile == int(counts.max())


def test_perforated_one_array():
    r = runtime_model(paper_net(), (3, 32, 32), tiles=(16, 4, 1), scheme="perforated")
    assert r.arrays == 3 and r.weights == 79_328
    assert [c.patches_per_tile for c in r.layers] == [64, 64, 64]
    assert [c.inference for c in r.layers] == [1024, 256, 64]  # evaluation: all pixels
    assert r.speedup_pipelined == 16.0


def test_grid_scheme_balanced_is_square():
    r = runtime_model(alexnet_convs(), (3, 224, 224), tiles="balanced", scheme="alternate")
    assert r.tiles == (25, 9, 1, 1, 1)  # ceil(3025/169)=18 -> 25, ceil(729/169)=5 -> 9


def test_alexnet():
    r = runtime_model(alexnet_convs(), (3, 224, 224), tiles="balanced")
    assert [c.np for c in r.layers] == [55 * 55, 27 * 27, 13 * 13, 13 * 13, 13 * 13]
    assert [c.k for c in r.layers] == [11 * 11 * 3, 5 * 5 * 64, 3 * 3 * 192, 3 * 3 * 384, 3 * 3 * 256]
    assert [c.cout for c in r.layers] == [64, 192, 384, 256, 256]
    # balanced = ceil(np / 169); the paper's (17, 4, 1, 1, 1) is floor(np / 169)
    assert r.tiles == (18, 5, 1, 1, 1)
    assert [c.patches_per_tile for c in r.layers] == [169, 146, 169, 169, 169]
    assert r.speedup_pipelined == pytest.approx(3025 / 169)
    paper = runtime_model(alexnet_convs(), (3, 224, 224), tiles=(17, 4, 1, 1, 1))
    assert [c.patches_per_tile for c in paper.layers] == [178, 183, 169, 169, 169]
    assert paper.speedup_pipelined == pytest.approx(3025 / 183)
    assert paper.load_balance == pytest.approx(169 / 183)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tiles=(16, 4)), "entries"),
    (dict(tiles=(16, 0, 1)), "nt=0"),
    (dict(tiles=(2000, 4, 1)), "no patch"),
    (dict(tiles=(15, 4, 1), scheme="alternate"), "square"),
    (dict(tiles="many"), "balanced"),
    (dict(scheme="random"), "without tiles"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        runtime_model(paper_net(), (3, 32, 32), **kwargs)


def test_layer_cost_rejects_bad_values():
    with pytest.raises(ValueError, match="np=0"):
        LayerCost("c", 0, 3, 3)
    with pytest.raises(ValueError, match="layers"):
        RuntimeReport([])


def test_plot(tmp_path):
    path = tmp_path / "r.png"
    plot_runtime(runtime_model(paper_net(), (3, 32, 32), tiles=(16, 4, 1)), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_files(tmp_path, capsys):
    rc = main(["speedup", "--model", "alexnet", "--tiles", "17,4,1,1,1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "16.53x" in out  # 3025 / 183
    data = json.loads((tmp_path / "runtime.json").read_text())
    assert [layer["np"] for layer in data["layers"]] == [3025, 729, 169, 169, 169]
    assert data["tiles"] == [17, 4, 1, 1, 1]
    rows = list(csv.DictReader(open(tmp_path / "runtime.csv")))
    assert [int(row["patches_per_tile"]) for row in rows] == [178, 183, 169, 169, 169]
    assert (tmp_path / "runtime.png").stat().st_size > 0


def test_cli_convnet_default(capsys):
    pytest.importorskip("rapa.models")
    assert main(["speedup"]) == 0
    out = capsys.readouterr().out
    assert "16.00x" in out and "load balance (min/max patches per tile) 1.000" in out


@pytest.mark.parametrize("argv, match", [
    (["--model", "vgg"], "unknown"),
    (["--model", "alexnet", "--tiles", "16,4,1"], "5 conv layers"),
    (["--model", "alexnet", "--tiles", "16,0,1,1,1"], ">= 1"),
    (["--model", "alexnet", "--tiles", "a,b"], "integers"),
    (["--model", "alexnet", "--input-size", "3,32"], "3 numbers"),
    (["--model", "alexnet", "--input-size", "3,8,8"], ""),  # too small for AlexNet
])
def test_cli_errors(argv, match, capsys):
    assert main(["speedup", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rapa speedup: error:")
    assert match in err
