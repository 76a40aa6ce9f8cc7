"""``rapa.convert(..., skip=...)``, the conversion summary, ``rapa convert``, the modern nets
of :mod:`rapa.nets` and the run-time model's count of grouped layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import rapa
from rapa import TiledConv2d
from rapa.cli import main
from rapa.nets import ResidualNet, SeparableNet, build_net
from rapa.runtime import LayerCost, runtime_model
from rapa.summary import conversion_summary

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiled(net):
    return {n: m for n, m in net.named_modules() if isinstance(m, TiledConv2d)}


@pytest.mark.parametrize("cls", [ResidualNet, SeparableNet])
def test_convert_keeps_function_of_modern_nets(cls):
    """Every layer converted (depthwise and 'same'-free strided ones too); identical replicas
    give the same outputs and input gradients as the original net."""
    torch.manual_seed(0)
    net = cls().eval()
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    ref = net(x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    rapa.convert(net, "balanced", input_size=(1, 28, 28))
    assert not [m for m in net.modules() if type(m) is nn.Conv2d]
    y = net(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), x)[0], g_ref, rtol=1e-3, atol=1e-4)
    # np = 784, 196, 49 at 28x28, 14x14, 7x7: balanced tiles ceil(np / 49) = 16, 4, 1
    want = [16] * 3 + [4] * 3 + [1] * 3 if cls is ResidualNet else [16] * 3 + [4] * 4 + [1] * 2
    assert [m.tiles for m in _tiled(net).values()] == want


def test_skip_by_name_prefix_and_predicate():
    net = SeparableNet()
    rapa.convert(net, 4, skip=["stem", "blocks.3"])
    tiled = _tiled(net)
    assert "stem.0" not in tiled and "blocks.3.depthwise.0" not in tiled and "blocks.3.pointwise.0" not in tiled
    assert "blocks.0.depthwise.0" in tiled and tiled["blocks.0.depthwise.0"].groups == 16
    net2 = SeparableNet()
    rapa.convert(net2, 4, skip=lambda name, layer: layer.groups > 1)  # depthwise layers stay digital
    assert all(m.groups == 1 for m in _tiled(net2).values())
    assert sum(isinstance(m, nn.Conv2d) for m in net2.modules()) == 4


def test_skip_errors_and_tiles_count_only_converted_layers():
    with pytest.raises(ValueError, match="skip='nope' names no nn.Conv2d"):
        rapa.convert(ResidualNet(), 4, skip=["nope"])
    net = ResidualNet()
    rapa.convert(net, [2] * 8, skip="stem")  # 9 conv layers, one skipped
    assert len(_tiled(net)) == 8
    with pytest.raises(ValueError, match="8 nn.Conv2d layers to convert"):
        rapa.convert(ResidualNet(), [2] * 9, skip="stem")


def test_summary_numbers_follow_the_runtime_formulas():
    net = SeparableNet()
    rapa.convert(net, "balanced", input_size=(1, 28, 28), skip=["stem"])
    s = conversion_summary(net, (1, 28, 28))
    rows = {r.name: r for r in s.layers}
    stem, dw = rows["stem.0"], rows["blocks.1.depthwise.0"]  # dw: 32 channels, stride 2 -> 14x14
    assert (stem.tiled, stem.nt, stem.np, stem.patches_per_tile, stem.speedup) == (False, 1, 784, 784, 1.0)
    assert (dw.tiled, dw.groups, dw.np, dw.nt, dw.arrays, dw.patches_per_tile) == (True, 32, 196, 4, 4 * 32, 49)
    assert dw.speedup == pytest.approx(4.0)
    # balanced over the converted layers: min np = 49, so ceil(784/49) = 16 tiles at 28x28
    assert rows["blocks.0.pointwise.0"].nt == 16
    # the skipped stem (784 patches on one array) is the pipeline's bottleneck: no speed-up
    assert s.report.speedup_pipelined == pytest.approx(1.0)
    nps = [r.np for r in s.layers]
    ppt = [r.patches_per_tile for r in s.layers]
    assert s.report.speedup_sequential == pytest.approx(sum(nps) / sum(ppt))
    text = str(s)
    assert "left as nn.Conv2d: stem.0" in text and "pipelined 1.00x" in text and "blocks.1.depthwise.0" in text
    assert s.to_dict()["layers"][0]["name"] == "stem.0"


def test_runtime_counts_every_group_as_arrays():
    cost = LayerCost("dw", np=196, k=9, cout=64, nt=4, scheme="random", bias=False, groups=64)
    assert (cost.arrays, cost.weights, cost.patches_per_tile, cost.macs) == (256, 256 * 9, 49, 196 * 9 * 64)
    with pytest.raises(ValueError, match="groups=3 does not divide cout=64"):
        LayerCost("dw", 196, 9, 64, groups=3)
    report = runtime_model(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4)), (8, 6, 6))
    assert (report.layers[0].k, report.layers[0].groups, report.layers[0].arrays) == (18, 4, 4)


def test_rapa_convert_command(capsys, tmp_path):
    out = tmp_path / "s.json"
    assert main(["convert", "--net", "separable", "--skip", "stem", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 of 9 conv layers tiled" in text and "blocks.0.depthwise.0" in text
    assert json.loads(out.read_text())["layers"][1]["nt"] == 16
    assert main(["convert", "--net", "resnet", "--tiles", "4", "--scheme", "alternate"]) == 0
    assert "alternate" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--skip", "bogus"], "skip='bogus' names no nn.Conv2d"),
    (["--tiles", "3,4"], "tiles=(3, 4) has 2 entries"),
    (["--tiles", "x"], "--tiles 'x'"),
    (["--input-size", "1,28"], "three numbers"),
    (["--net", "resnet", "--tiles", "4", "--scheme", "image_pad", "--input-size", "1,28,28"], None),
])
def test_rapa_convert_errors_are_one_line(argv, match, capsys):
    rc = main(["convert", *argv])
    err = capsys.readouterr().err
    if match is None:
        assert rc == 0
        return
    assert rc == 2 and len(err.strip().splitlines()) == 1 and match in err


def test_build_net_rejects_unknown_and_bad_arguments():
    with pytest.raises(ValueError, match="net='vgg' is unknown"):
        build_net("vgg")
    with pytest.raises(ValueError, match="strides"):
        SeparableNet(channels=(8, 16), strides=(1, 2))


def test_modern_demonstration_runs_aggregates_and_skips_finished_runs(tmp_path, capsys):
    """A tiny run of each kind on the embedded digits (8x8: np = 64, 16, 4 -> tiles 16, 4, 1),
    its record, the aggregate's mean and t-interval, and a rerun that trains nothing."""
    import math

    from rapa import modern

    runs = [modern.ModernRun("resnet", tiled, seed, epochs=1, batch_size=16, dataset="digits", limit_train=64,
                             limit_test=40, votes=3) for tiled in (False, True) for seed in (0, 1)]
    results = [modern.run_one(r, tmp_path) for r in runs]
    tiled = results[2]
    assert tiled["tiles"] == [16] * 3 + [4] * 3 + [1] * 3 and tiled["speedup_pipelined"] == pytest.approx(16.0)
    assert results[0]["tiles"] == [1] * 9 and results[0]["vote_error"] == results[0]["single_error"]
    assert json.loads((tmp_path / "resnet-tiled-s1" / "run.json").read_text())["test_images"] == 40
    lo, hi = tiled["single_error_ci"]
    assert lo <= tiled["single_error"] <= hi
    text = modern.aggregate(tmp_path)
    row = json.loads((tmp_path / "summary.json").read_text())["rows"][1]
    singles = [results[2]["single_error"], results[3]["single_error"]]
    mean, sd = sum(singles) / 2, abs(singles[0] - singles[1]) / math.sqrt(2)
    assert row["single_error"][0] == pytest.approx(mean)
    assert row["single_error"][1] == pytest.approx(12.706 * sd / math.sqrt(2))
    assert "| resnet | balanced random | 2 |" in text
    assert main(["modern", "--out", str(tmp_path), "--nets", "resnet", "--seeds", "0", "1", "--jobs", "1"]) == 0
    assert "wall time" not in capsys.readouterr().out  # nothing left to train


def test_modern_intervals_and_option_errors(capsys):
    from rapa import modern

    assert modern.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)  # the textbook value
    lo, hi = modern.wilson(50, 1000)
    assert (lo, hi) == (pytest.approx(0.0382, abs=1e-4), pytest.approx(0.0653, abs=1e-4))
    assert modern._mean_ci([0.1, 0.2, 0.3]) == (pytest.approx(0.2), pytest.approx(4.303 * 0.1 / 3 ** 0.5))
    assert main(["modern", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err
