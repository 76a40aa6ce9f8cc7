"""What the analog arrays did (``rapa.analog.diagnostics``, ``arrays.json`` of an analog run).

Checked against what is known independently of the code: weights written far past every
device's bound sit at it; the logical weights are aihwkit's own scaled read-out; a rank-one
update asks for pulses in proportion to the learning rate, and every row saturates when the
rate is absurdly high and none when it is tiny; an FC array sees one rank-one update per
training image and a conv array one per output pixel and image.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.analog

pytest.importorskip("aihwkit")

from rapa.analog import AnalogTiledConv2d, analog_optimizer, convert_to_analog, get_preset, manual_seed  # noqa: E402
from rapa.analog.diagnostics import (UpdateMonitor, array_stats, format_stats, layer_stats,  # noqa: E402
                                    replica_similarity)
from rapa.config import TrainConfig  # noqa: E402
from rapa.data import dataset_info  # noqa: E402
from rapa.train import train  # noqa: E402


def test_weights_written_past_the_bounds_count_as_at_a_bound():
    layer = AnalogTiledConv2d(2, 4, 3, bias=False, tiles=2, scheme="random", preset="rpu-baseline")
    tiles = [next(a.analog_tiles()) for a in layer.analog_arrays()]
    for j, tile in enumerate(tiles):  # stored weights: rows 0..j far past any bound, the rest 0
        w = torch.zeros(4, 18)
        w[: j + 1] = 100.0 * (1 - 2 * (torch.arange(18) % 2))  # +-100: clipped to each device's bounds
        tile.tile.set_weights(w)
    stats = array_stats(layer)
    assert [s.name for s in stats] == ["arrays.0", "arrays.1"]
    assert [(s.rows, s.cols) for s in stats] == [(4, 18), (4, 18)]
    assert [s.at_bound for s in stats] == pytest.approx([1 / 4, 2 / 4])
    weight, _ = layer.get_weights()  # aihwkit's read-out, the output scales applied: (nk, cout, cin, 3, 3)
    for j, s in enumerate(stats):
        assert s.weight_rms == pytest.approx(weight[j].pow(2).mean().sqrt().item(), rel=1e-5)
    per_layer = layer_stats(stats)
    assert per_layer[""]["arrays"] == 2 and per_layer[""]["at_bound"] == pytest.approx(3 / 8)


def test_fresh_arrays_hold_no_weight_at_a_bound_when_scaled_into_range():
    manual_seed(0)
    layer = AnalogTiledConv2d(2, 4, 3, tiles=2, preset="rpu-baseline")
    # rpu-baseline's weight scaling writes the largest weight at 0.3, half the mean bound: only
    # devices whose own bound is 30% lower than the mean's half can clip it
    assert all(s.at_bound < 0.1 for s in array_stats(layer))
    assert "\n| 0 | 2 | " in format_stats(nn.Sequential(layer))  # layer "0" of the Sequential, 2 arrays


def _fc_model(seed: int = 1, **preset):
    manual_seed(seed)
    torch.manual_seed(seed)
    return convert_to_analog(nn.Sequential(nn.Linear(8, 4)), get_preset("rpu-baseline", **preset))


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_update_monitor_counts_pulses_in_proportion_to_the_rate():
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    mean = {}
    for lr in (0.01, 0.02):
        model = _fc_model(out_noise=0.0)  # no read noise: the same logits, so the same d, at both rates
        monitor = UpdateMonitor(analog_optimizer(model, lr=lr), model)
        _step(model, monitor.optimizer, x, y)
        (summary,) = monitor.summary().values()
        assert summary["rows"] == 6  # one rank-one update per image
        mean[lr] = summary["mean_pulses"]
    assert mean[0.02] == pytest.approx(2 * mean[0.01], rel=1e-5)
    for lr, saturated in ((1e4, 1.0), (1e-9, 0.0)):
        model = _fc_model()
        monitor = UpdateMonitor(analog_optimizer(model, lr=lr), model)
        _step(model, monitor.optimizer, x, y)
        assert next(iter(monitor.summary().values()))["saturated"] == saturated


def test_update_monitor_changes_no_update_and_gives_the_step_back():
    # `ideal` arrays update exactly (aihwkit's pulse draws cannot be replayed), so a monitored
    # step must give bit for bit the unmonitored one
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    weights = []
    for monitored in (False, True):
        torch.manual_seed(1)
        model = convert_to_analog(nn.Sequential(nn.Linear(8, 4)), "ideal")
        optimizer = analog_optimizer(model, lr=0.05)
        monitor = UpdateMonitor(optimizer, model) if monitored else None
        before = model[0].get_weights()[0]
        for _ in range(2):
            _step(model, optimizer, x, y)
        weights.append(model[0].get_weights()[0])
        assert not torch.equal(weights[-1], before)  # the steps moved the weights
        if monitor is not None:
            assert monitor.summary() == {}  # floating-point arrays have no pulses to count
            monitor.close()
            assert "step" not in vars(optimizer)  # the class's own step again
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_replica_similarity_is_the_papers_measure_of_the_weights_on_the_arrays(corrcoef_similarity):
    """Identical replicas read 1; drawn ones match the measure written out with numpy, from
    the weights as the arrays store them; untiled layers and digital nets have no entry."""
    manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("tiled", AnalogTiledConv2d(3, 4, 3, tiles=4, scheme="random", preset="ideal"))
    model.add_module("single", AnalogTiledConv2d(4, 4, 3, tiles=1, scheme="random", preset="ideal"))
    tiled = model.tiled
    w = torch.randn(4, 3, 3, 3)
    tiled.set_weights(w.expand(4, -1, -1, -1, -1).clone(), torch.zeros(4, 4))
    assert replica_similarity(model) == pytest.approx({"tiled": 1.0})
    w = torch.randn(4, 4, 3, 3, 3)
    w[1] = 0.5 * w[0] + 0.1 * w[1]  # one pair nearly alike, the rest unrelated
    tiled.set_weights(w, torch.zeros(4, 4))
    stored = tiled.get_weights()[0]
    assert replica_similarity(model)["tiled"] == pytest.approx(corrcoef_similarity(stored.numpy()), abs=1e-6)
    assert replica_similarity(nn.Sequential(nn.Conv2d(3, 4, 3))) == {}


@pytest.mark.slow
def test_analog_run_writes_one_arrays_record_per_epoch(tmp_path, one_thread):
    config = TrainConfig(dataset="digits", epochs=1, limit_train=40, limit_test=20, channels=(4, 4, 4),
                         tiles=(4, 2, 1), analog="rpu-baseline", warmup_epochs=0, votes=1)
    train(config, tmp_path / "run", progress=False)
    config.epochs = 2  # resumed for a second epoch: the first epoch's record stays
    train(config, tmp_path / "run", resume=True, progress=False)
    records = json.loads((tmp_path / "run" / "arrays.json").read_text())["epochs"]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r["layers"]) == {"conv1", "conv2", "conv3", "fc"}
        assert r["layers"]["conv1"]["arrays"] == 4 and r["layers"]["conv2"]["arrays"] == 2
        assert r["updates"]["fc"]["rows"] == 40  # one rank-one update per training image
        side = dataset_info("digits").size  # conv1 keeps the image's size (5x5, padding 2)
        assert r["updates"]["conv1"]["rows"] == 40 * side * side  # one per output pixel of conv1 and image
        assert 0 <= r["updates"]["fc"]["saturated"] <= 1
        assert set(r["similarity"]) == {"conv1", "conv2"}  # the layers with replicas
        assert all(-1 <= v <= 1 for v in r["similarity"].values())
