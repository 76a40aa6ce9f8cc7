"""Training on simulated analog arrays (``rapa.analog``, aihwkit backend; SPEC §5).

References: the digital :class:`rapa.TiledConv2d` (tested against the SPEC elsewhere) for
the perfect ``ideal`` arrays, plain SGD arithmetic for the exact update, the SPEC's /
paper's numbers for the ``rpu-baseline`` preset, chance level for learning.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rapa.errors import RapaError
from rapa.tiled_conv import TiledConv2d

INSTALL = r'analog training needs aihwkit: pip install "rapa\[analog\]"'


def _aihwkit():
    return pytest.importorskip("aihwkit")


# ---------------------------------------------------------------------------------- no aihwkit


def test_missing_aihwkit_says_how_to_install(monkeypatch):
    import rapa

    for name in [m for m in sys.modules if m == "rapa.analog" or m.startswith(("rapa.analog.", "aihwkit"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(rapa, "analog", raising=False)  # restored afterwards, like sys.modules
    monkeypatch.setitem(sys.modules, "aihwkit", None)  # import aihwkit -> ImportError

    analog = importlib.import_module("rapa.analog")  # so does the package itself
    assert "ideal" in analog.PRESETS and analog.get_preset("rpu-baseline").dw_min == 0.00025
    assert not analog.aihwkit_available()
    with pytest.raises(RapaError, match=INSTALL):
        analog.require_aihwkit()
    for name in ("prepare", "convert_to_analog", "AnalogTiledConv2d", "analog_state_dict"):
        with pytest.raises(RapaError, match=INSTALL):
            getattr(analog, name)


def test_rapa_imports_without_aihwkit():
    code = ("import sys; sys.modules['aihwkit'] = None; import rapa, rapa.analog, rapa.models; "
            "assert 'aihwkit' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unknown_preset_is_a_user_error():
    from rapa.analog import get_preset

    with pytest.raises(RapaError, match="analog preset 'nope' is unknown"):
        get_preset("nope")
    with pytest.raises(ValueError, match="no field"):
        get_preset("rpu-baseline", dw_max=1.0)


# ---------------------------------------------------------------------------------- presets


@pytest.mark.analog
def test_perfect_backward_reads_the_input_gradient_exactly(one_thread):
    """``perfect_backward=true``: an rpu-baseline array's input gradient is d @ W of the weights
    aihwkit reads off it; by default (converters, output noise) it is not."""
    _aihwkit()
    from rapa.analog import convert_to_analog, get_preset

    torch.manual_seed(0)
    linear = nn.Linear(20, 8)
    x, d = torch.randn(5, 20), torch.randn(5, 8)
    grads = {}
    for perfect in (True, False):
        analog = convert_to_analog(linear, get_preset("rpu-baseline", perfect_backward=perfect))
        xr = x.clone().requires_grad_(True)
        analog(xr).backward(d)
        w, _ = analog.get_weights()  # (8, 20), the read-out in the digital layer's scale
        grads[perfect] = (xr.grad, d @ w)
    torch.testing.assert_close(*grads[True], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(*grads[False], rtol=1e-3, atol=1e-4)


@pytest.mark.analog
def test_perfect_update_is_sgds_update_of_the_stored_inputs_and_gradients(one_thread):
    """``perfect_update=true``: one AnalogSGD step changes an rpu-baseline array's weights by
    exactly ``-lr * d^T x`` (bias: ``-lr * sum d``), x and d as the array kept them from the
    forward and backward (away from the devices' bounds); by default (stochastic pulse trains)
    it does not."""
    _aihwkit()
    from rapa.analog import analog_optimizer, convert_to_analog, get_preset

    torch.manual_seed(0)
    linear = nn.Linear(20, 8)
    x, d, lr = torch.randn(5, 20), torch.randn(5, 8), 0.01
    errors = {}
    for perfect in (True, False):
        # weights written at a tenth of the mean bound: none at its own device's bound, where a
        # step is clipped
        analog = convert_to_analog(linear, get_preset("rpu-baseline", perfect_update=perfect, weight_range=0.1))
        optimizer = analog_optimizer(analog, lr=lr)
        w0, b0 = (t.clone() for t in analog.get_weights())
        analog(x).backward(d)
        ctx = next(p for p in analog.parameters() if hasattr(p, "analog_input"))
        xs, ds = ctx.analog_input[0], ctx.analog_grad_output[0]  # (5, 20), (5, 8)
        expected = -lr * ds.t() @ torch.cat([xs, torch.ones(5, 1)], 1)  # (8, 21): the bias column reads 1
        optimizer.step()
        w1, b1 = analog.get_weights()
        change = torch.cat([w1 - w0, (b1 - b0)[:, None]], 1)  # (8, 21)
        assert expected.abs().max() > 1e-3  # a step large enough to see
        errors[perfect] = float((change - expected).abs().max() / expected.abs().max())
    assert errors[True] < 1e-4, errors
    assert errors[False] > 1e-2, errors


@pytest.mark.analog
def test_rpu_baseline_has_the_papers_numbers():
    _aihwkit()
    from aihwkit.simulator.configs import ConstantStepDevice, SingleRPUConfig
    from aihwkit.simulator.parameters import BoundManagementType, NoiseManagementType, PulseType

    from rapa.analog import get_preset

    c = get_preset("rpu-baseline").rpu_config(construction_seed=7)
    assert isinstance(c, SingleRPUConfig) and isinstance(c.device, ConstantStepDevice)
    d = c.device
    assert d.dw_min == 0.001 / 4  # four times Gokmen & Vlasov's states (paper §3.2)
    assert (d.dw_min_dtod, d.dw_min_std, d.w_max_dtod, d.w_min_dtod) == (0.3, 0.3, 0.3, 0.3)
    assert d.up_down == 0.0 and d.w_max == -d.w_min == 0.6 and d.construction_seed == 7
    for io_ in (c.forward, c.backward):
        assert io_.inp_res == pytest.approx(1 / (2**7 - 2)) and io_.out_res == pytest.approx(1 / (2**9 - 2))
        assert io_.out_noise > 0 and not io_.is_perfect
        assert io_.noise_management == NoiseManagementType.ABS_MAX
        assert io_.bound_management == BoundManagementType.ITERATIVE
    assert c.update.update_management and c.update.update_bl_management
    assert c.update.pulse_type == PulseType.STOCHASTIC_COMPRESSED and c.update.desired_bl == 31
    assert c.mapping.max_input_size == 0 and c.mapping.max_output_size == 0  # one array per replica


@pytest.mark.analog
def test_aihwkit_presets_by_name():
    _aihwkit()
    from aihwkit.simulator.presets import IdealizedPreset

    from rapa.analog import get_preset

    for name in ("aihwkit:IdealizedPreset", "idealized"):
        c = get_preset(name).rpu_config(construction_seed=3)
        assert isinstance(c, IdealizedPreset) and c.device.construction_seed == 3
        assert c.mapping.max_input_size == 0 and c.device.dw_min == 0.0002
    with pytest.raises(RapaError, match="aihwkit:NoSuchPreset' is unknown"):
        get_preset("aihwkit:NoSuchPreset").rpu_config()


# ------------------------------------------------------------------------ ideal == digital


@pytest.mark.parametrize("scheme,nt,h", [
    ("random", 4, 6), ("random", 5, 6),  # 36 pixels / 5 tiles: empty slots in the index
    ("alternate", 4, 6), ("image_overlap", 4, 6), ("image_pad", 4, 6), ("random_fixed", 3, 5),
    ("perforated", 3, 6), ("none", 1, 5),
])
@pytest.mark.analog
def test_ideal_analog_layer_equals_digital_layer(scheme, nt, h):
    _aihwkit()
    from rapa.analog import AnalogTiledConv2d

    torch.manual_seed(0)
    digital = TiledConv2d(3, 4, 3, padding=1, tiles=nt, scheme=scheme)
    analog = AnalogTiledConv2d.from_tiled(digital, "ideal")
    assert analog.num_kernels == digital.num_kernels
    x = torch.randn(2, 3, h, h + 1)
    index = digital.assignment(x)
    xd = x.clone().requires_grad_()
    xa = x.clone().requires_grad_()
    yd = digital(xd, index)
    ya = analog(xa, index)
    torch.testing.assert_close(ya, yd, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yd)
    yd.backward(g)
    ya.backward(g)
    torch.testing.assert_close(xa.grad, xd.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.analog
def test_analog_assignment_is_the_digital_layers():
    _aihwkit()
    from rapa.analog import AnalogTiledConv2d

    digital = TiledConv2d(2, 3, 3, padding=1, tiles=4, scheme="random_fixed")
    analog = AnalogTiledConv2d.from_tiled(digital, "ideal")
    x = torch.randn(1, 2, 6, 6)
    assert torch.equal(analog.assignment(x), digital.assignment(x))  # same saved seed
    a = AnalogTiledConv2d(2, 3, 3, padding=1, tiles=4, scheme="random", preset="ideal")
    d = TiledConv2d(2, 3, 3, padding=1, tiles=4, scheme="random")
    torch.manual_seed(6)
    i1 = a.assignment(x)
    torch.manual_seed(6)
    assert torch.equal(i1, d.assignment(x))  # same draw from torch's generator


@pytest.mark.analog
def test_every_replica_and_the_fc_layer_is_its_own_array():
    _aihwkit()
    from aihwkit.nn import AnalogLinear
    from aihwkit.simulator.tiles import AnalogTile

    from rapa.analog import AnalogTiledConv2d, manual_seed, prepare
    from rapa.config import TrainConfig
    from rapa.models import ConvNet

    manual_seed(0)
    model = ConvNet(in_channels=1, channels=(4, 4, 8), tiles=(16, 4, 1), image_size=8)
    config = TrainConfig(dataset="digits", tiles=(16, 4, 1), analog="rpu-baseline", momentum=0.5)
    analog, optimizer = prepare(model, config)
    assert [analog.conv1.num_kernels, analog.conv2.num_kernels, analog.conv3.num_kernels] == [16, 4, 1]
    assert all(isinstance(c, AnalogTiledConv2d) for c in (analog.conv1, analog.conv2, analog.conv3))
    assert isinstance(analog.fc, AnalogLinear) and isinstance(model.fc, nn.Linear)  # model untouched
    tiles = [m for m in analog.modules() if isinstance(m, AnalogTile)]
    assert len(tiles) == 16 + 4 + 1 + 1
    assert {(t.in_size, t.out_size) for t in tiles[:16]} == {(25, 4)}  # exact size, one array each
    # own devices: the device-to-device variations differ between replicas of a layer
    bounds = [t.get_hidden_parameters()["max_bound"] for t in tiles[:16]]
    assert not torch.equal(bounds[0], bounds[1])
    from rapa.config import ANALOG_LR_TILED

    assert {g["lr"] for g in optimizer.param_groups} == {ANALOG_LR_TILED}  # the analog recipe's, every layer
    assert ANALOG_LR_TILED == pytest.approx(0.02)
    _, scaled = prepare(model, dataclasses.replace(config, tile_lr_power=0.5))  # per-layer rates on request
    assert sorted({round(g["lr"], 12) for g in scaled.param_groups}) == [0.02, 0.04, 0.08]


@pytest.mark.analog
def test_ideal_convnet_equals_digital_convnet():
    _aihwkit()
    from rapa.analog import prepare
    from rapa.config import TrainConfig
    from rapa.models import ConvNet

    torch.manual_seed(0)
    model = ConvNet(in_channels=1, channels=(4, 4, 8), tiles=(16, 4, 1), image_size=8).eval()
    with torch.no_grad():  # larger weights than Caffe's, so that the comparison is not trivial
        for p in model.parameters():
            p.normal_(0, 0.3)
    analog, _ = prepare(model, TrainConfig(dataset="digits", analog="ideal"))
    x = torch.randn(3, 1, 8, 8)
    indices = [layer.assignment(x_) for layer, x_ in zip(model.convs, (x, torch.zeros(3, 4, 4, 4),
                                                                      torch.zeros(3, 4, 2, 2)))]
    torch.testing.assert_close(analog(x, indices), model(x, indices), atol=1e-5, rtol=1e-4)


@pytest.mark.analog
def test_digital_layers_stay_floating_point_and_learn_by_sgd():
    _aihwkit()
    from aihwkit.nn import AnalogLinear
    from rapa.analog import AnalogTiledConv2d, convert_to_analog, prepare
    from rapa.config import TrainConfig
    from rapa.models import ConvNet

    torch.manual_seed(0)
    model = ConvNet(in_channels=1, channels=(4, 4, 8), tiles=(4, 2, 1), image_size=8, init="he")
    analog, opt = prepare(model, TrainConfig(dataset="digits", analog="rpu-baseline", digital_layers=("fc",),
                                             lr=0.1))
    assert type(analog.fc) is nn.Linear and not isinstance(analog.fc, AnalogLinear)
    assert all(isinstance(c, AnalogTiledConv2d) for c in (analog.conv1, analog.conv2, analog.conv3))
    torch.testing.assert_close(analog.fc.weight, model.fc.weight)  # the digital net's FC, unchanged
    # one step: the digital FC takes exactly SGD's step from its own gradient (weight decay
    # lr * 1e-4 * w included), computed here by hand
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    w0 = analog.fc.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(analog(x), y).backward()
    g = analog.fc.weight.grad.detach().clone()
    opt.step()
    wd = TrainConfig(dataset="digits").resolved_weight_decay()
    torch.testing.assert_close(analog.fc.weight.detach(), w0 - 0.1 * (g + wd * w0))
    with pytest.raises(ValueError, match="'fc2'"):
        convert_to_analog(model, "ideal", digital=["fc2"])
    with pytest.raises(ValueError, match=r"layer_presets=\['conv9'\]"):
        convert_to_analog(model, "ideal", layer_presets={"conv9": "rpu-baseline"})
    with pytest.raises(ValueError, match="'fc'.*stay digital"):
        convert_to_analog(model, "ideal", digital=["fc"], layer_presets={"fc": "rpu-baseline"})
    mixed = convert_to_analog(model, "ideal", digital=["conv3"], layer_presets={"fc": "rpu-baseline"})
    assert type(mixed.conv3) is type(model.conv3)
    assert mixed.conv1.preset.name == "ideal" and "FloatingPoint" not in type(mixed.fc.analog_module.rpu_config).__name__


@pytest.mark.analog
def test_voting_runs_when_only_the_tiled_layers_are_analog():
    """A random-tiled net whose tiled layers are analog and whose untiled ones are digital
    (``--digital-layers conv3,fc``) is voted on: its passes differ (one assignment each). (The
    check once looked for digital random layers only and gave such a net one pass.)"""
    _aihwkit()
    from rapa.analog import convert_to_analog
    from rapa.data import load_dataset
    from rapa.models import ConvNet
    from rapa.train import evaluate

    torch.manual_seed(0)
    model = ConvNet(in_channels=1, channels=(4, 4, 8), tiles=(4, 2, 1), image_size=28, init="he")
    mixed = convert_to_analog(model, "ideal", digital=["conv3", "fc"]).eval()
    data = load_dataset("digits", "test", limit=40)
    x = data.images.float()[:8] / 255
    assert not torch.equal(mixed(x), mixed(x))  # two passes, two assignments
    res = evaluate(mixed, data, votes=5, device="cpu")
    assert res["adaptive_passes"] > 1.0  # not the one pass of a deterministic net


def test_digital_layers_are_checked_by_the_config():
    from rapa.config import TrainConfig

    with pytest.raises(RapaError, match="needs analog"):
        TrainConfig(dataset="digits", digital_layers=("fc",)).validate()
    with pytest.raises(RapaError, match="'fc9'.*conv1, conv2, conv3, fc"):
        TrainConfig(dataset="digits", analog="ideal", digital_layers=("fc9",)).validate()
    with pytest.raises(RapaError, match="'conv9.dw_min=1': the net has no layer 'conv9'"):
        TrainConfig(dataset="digits", analog="rpu-baseline", analog_options=("conv9.dw_min=1",)).validate()
    with pytest.raises(RapaError, match="'fc.dw_min=1': layer fc is digital"):
        TrainConfig(dataset="digits", analog="rpu-baseline", digital_layers=("fc",),
                    analog_options=("fc.dw_min=1",)).validate()


# --------------------------------------------------------------------------------- training


@pytest.mark.analog
def test_ideal_analog_sgd_is_exact_sgd_and_pulsed_sgd_moves_downhill():
    _aihwkit()
    from rapa.analog import AnalogTiledConv2d, analog_optimizer

    torch.manual_seed(0)
    digital = TiledConv2d(2, 3, 3, padding=1, tiles=4)
    x = torch.randn(4, 2, 6, 6)
    target = torch.randn(4, 3, 6, 6)
    index = digital.assignment(x)
    lr = 0.05

    F.mse_loss(digital(x, index), target, reduction="sum").backward()
    expected = digital.weight.detach() - lr * digital.weight.grad  # plain SGD by hand

    for preset in ("ideal", "rpu-baseline"):
        analog = AnalogTiledConv2d.from_tiled(digital, preset)
        w0, _ = analog.get_weights()
        opt = analog_optimizer(analog, lr)
        opt.zero_grad()
        F.mse_loss(analog(x, index), target, reduction="sum").backward()
        opt.step()
        w1, _ = analog.get_weights()
        if preset == "ideal":
            torch.testing.assert_close(w1, expected, atol=1e-5, rtol=1e-4)
        else:  # pulses of +-dw_min: the weights change, on the whole along -grad
            delta = (w1 - w0).flatten()
            assert delta.abs().max() > 0
            cos = F.cosine_similarity(delta, -digital.weight.grad.flatten(), dim=0)
            assert cos > 0.3, float(cos)


def _digits_net() -> nn.Module:
    class Net(nn.Module):  # one RAPA conv layer (4 replicas) + FC: learns digits in seconds
        def __init__(self) -> None:
            super().__init__()
            self.conv = TiledConv2d(1, 16, 3, padding=1, tiles=4, scheme="random")
            self.fc = nn.Linear(16 * 4 * 4, 10)

        def forward(self, x):
            return self.fc(F.avg_pool2d(F.relu(self.conv(x)), 2).flatten(1))

    return Net()


@pytest.mark.slow
@pytest.mark.analog
def test_rpu_baseline_learns_digits(one_thread):
    _aihwkit()
    from rapa.analog import analog_optimizer, convert_to_analog, manual_seed
    from rapa.data import load_dataset, make_loader

    manual_seed(0)
    train = load_dataset("digits", "train", size=8, limit=1200)
    test = load_dataset("digits", "test", size=8)
    model = convert_to_analog(_digits_net(), "rpu-baseline")
    optimizer = analog_optimizer(model, lr=0.02)  # 0.23 here (0.25 at lr 0.01)
    loader = make_loader(train, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        x, y = next(iter(make_loader(test, len(test))))
        error = (model(x).argmax(1) != y).float().mean().item()
    assert error < 0.5, error  # chance is 0.9; untrained arrays: 0.91


# ----------------------------------------------------------------------- save, load, seeds


@pytest.mark.analog
def test_analog_state_round_trips_with_weights_only():
    _aihwkit()
    from rapa.analog import analog_optimizer, analog_state_dict, convert_to_analog, load_analog_state_dict

    torch.manual_seed(0)
    digital = _digits_net()
    x = torch.randn(5, 1, 8, 8)
    index = digital.conv.assignment(x)
    for preset in ("ideal", "rpu-baseline"):
        a = convert_to_analog(digital, preset)
        opt = analog_optimizer(a, 0.1)
        F.cross_entropy(a(x), torch.arange(5)).backward()
        opt.step()
        buf = io.BytesIO()
        torch.save(analog_state_dict(a), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)  # plain tensors only
        b = convert_to_analog(_digits_net(), preset)  # other weights, other devices
        load_analog_state_dict(b, state)
        for ta, tb in zip(a.conv.arrays, b.conv.arrays):
            ha, hb = ta.analog_module.get_hidden_parameters(), tb.analog_module.get_hidden_parameters()
            assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
        wa, ba = a.conv.get_weights()
        wb, bb = b.conv.get_weights()
        assert torch.equal(wa, wb) and torch.equal(ba, bb)
        assert all(torch.equal(p, q) for p, q in zip(a.fc.get_weights(), b.fc.get_weights()))
        if preset == "ideal":  # noise-free arrays: same outputs for the same index
            a.eval(), b.eval()
            with torch.no_grad():
                fa = a.fc(F.avg_pool2d(F.relu(a.conv(x, index)), 2).flatten(1))
                fb = b.fc(F.avg_pool2d(F.relu(b.conv(x, index)), 2).flatten(1))
            assert torch.equal(fa, fb)
        # resume: the loaded model trains on
        opt_b = analog_optimizer(b, 0.1)
        F.cross_entropy(b(x), torch.arange(5)).backward()
        opt_b.step()
        assert not torch.equal(b.conv.get_weights()[0], wb)
    with pytest.raises(KeyError, match="missing"):
        load_analog_state_dict(convert_to_analog(_digits_net(), "ideal"),
                               {k: v for k, v in state.items() if "fc" not in k})


@pytest.mark.analog
def test_prepared_model_checkpoints_with_its_own_state_dict():
    _aihwkit()
    from aihwkit.simulator.tiles import AnalogTile

    from rapa.analog import prepare
    from rapa.config import TrainConfig
    from rapa.models import ConvNet

    config = TrainConfig(dataset="digits", analog="rpu-baseline", momentum=0.9, pooling="mixed")

    def make():
        return prepare(ConvNet(in_channels=1, channels=(4, 4, 8), image_size=8, pooling="mixed"), config)

    torch.manual_seed(0)
    a, opt_a = make()
    x = torch.randn(4, 1, 8, 8)
    F.cross_entropy(a(x), torch.arange(4)).backward()
    opt_a.step()
    buf = io.BytesIO()  # what a trainer does: model and optimizer state in one file
    torch.save({"model": a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert not any(k.endswith(("analog_tile_state", "analog_ctx")) for k in ckpt["model"])

    torch.manual_seed(1)
    b, opt_b = make()
    b.load_state_dict(ckpt["model"])  # strict: every key accounted for
    opt_b.load_state_dict(ckpt["optimizer"])
    ta = [m for m in a.modules() if isinstance(m, AnalogTile)]
    tb = [m for m in b.modules() if isinstance(m, AnalogTile)]
    assert len(ta) == len(tb) == 16 + 4 + 1 + 1
    for p, q in zip(ta, tb):
        assert torch.equal(p.tile.get_weights(), q.tile.get_weights())
        assert torch.equal(p.tile.get_hidden_parameters(), q.tile.get_hidden_parameters())
    assert torch.equal(a.pool1.beta, b.pool1.beta)  # digital parameters too
    with pytest.raises(RuntimeError, match="Missing key.*fc.analog_module.analog_weights"):
        b.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("fc.")})


@pytest.mark.analog
def test_manual_seed_fixes_the_device_variations():
    _aihwkit()
    from rapa.analog import convert_to_analog, manual_seed

    def bounds(seed):
        manual_seed(seed)
        net = convert_to_analog(_digits_net(), "rpu-baseline")
        return torch.stack([a.analog_module.get_hidden_parameters()["max_bound"] for a in net.conv.arrays])

    b0 = bounds(0)
    assert torch.equal(b0, bounds(0))
    assert not torch.equal(b0, bounds(1))
    assert math.isclose(b0.mean().item(), 0.6, rel_tol=0.1)  # w_max = 0.6 on average


@pytest.mark.analog
def test_analog_options_set_every_arrays_fields_and_survive_a_reload(tmp_path, one_thread):
    """``--analog-options desired_bl=100,out_noise=0``: aihwkit's own config of every array
    (conv replicas and FC) carries the values, in a fresh run and in one loaded back."""
    _aihwkit()
    from aihwkit.simulator.tiles.module import TileModule

    from rapa.cli import main
    from rapa.train import load_run

    def fields(model):
        found = {}
        for layer in ("conv1", "conv2", "conv3", "fc"):
            tiles = [m for m in model.get_submodule(layer).modules() if isinstance(m, TileModule)]
            assert len(tiles) == {"conv1": 4, "conv2": 4}.get(layer, 1)  # tiles (4, 4, 1) and the FC layer
            found[layer] = {(int(t.rpu_config.update.desired_bl), float(t.rpu_config.forward.out_noise),
                             float(t.rpu_config.backward.out_noise)) for t in tiles}
        return found

    common = ["train", "--dataset", "digits", "--epochs", "1", "--limit-train", "20", "--limit-test", "10",
              "--channels", "4,4,4", "--tiles", "4,4,1", "--votes", "1", "--device", "cpu", "--quiet",
              "--analog", "rpu-baseline"]
    options = "desired_bl=100,out_noise=0,conv1.desired_bl=50,fc.out_noise=0.03"  # a layer's own value wins
    assert main([*common, "--analog-options", options, "--out", str(tmp_path / "bl")]) == 0
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    config = json.loads((tmp_path / "bl" / "config.json").read_text())
    assert config["analog_options"] == options.split(",")
    model, cfg, _ = load_run(tmp_path / "bl")
    assert cfg.analog_options == tuple(options.split(","))
    assert fields(model) == {"conv1": {(50, 0.0, 0.0)}, "conv2": {(100, 0.0, 0.0)}, "conv3": {(100, 0.0, 0.0)},
                             "fc": {(100, 0.03, 0.03)}}
    base, _, _ = load_run(tmp_path / "base")
    # rpu-baseline as it is (test_rpu_baseline_has_the_papers_numbers)
    assert fields(base) == {layer: {(31, 0.06, 0.06)} for layer in ("conv1", "conv2", "conv3", "fc")}


def test_analog_options_are_checked_against_the_preset():
    from rapa.analog.presets import preset_options

    assert preset_options("rpu-baseline", ("desired_bl=100", "out_noise=0.03", "digital_bias=true",
                                           "up_down=-0.01")) == {
        "desired_bl": 100, "out_noise": 0.03, "digital_bias": True, "up_down": -0.01}
    assert preset_options("aihwkit:IdealizedPreset", ("weight_range=0.3",)) == {"weight_range": 0.3}
    for name, item, message in [
        ("rpu-baseline", "desired_bl", "give FIELD=VALUE"),
        ("rpu-baseline", "bl=3", "has no field 'bl'; its fields are desired_bl,"),
        ("rpu-baseline", "desired_bl=0", "desired_bl takes an integer >= 1"),
        ("rpu-baseline", "out_noise=-1", "out_noise takes a finite number >= 0"),
        ("rpu-baseline", "w_max=inf", "w_max takes a finite number >= 0"),
        ("ideal", "digital_bias=yes", "digital_bias takes true or false"),
        ("aihwkit:IdealizedPreset", "class_name=GokmenVlasovPreset", "has no field 'class_name'"),
        ("nonsense", "desired_bl=3", "analog preset 'nonsense' is unknown"),
    ]:
        with pytest.raises(RapaError, match=re.escape(message)):
            preset_options(name, (item,))
    with pytest.raises(RapaError, match="desired_bl is given twice"):
        preset_options("rpu-baseline", ("desired_bl=3", "desired_bl=4"))


def test_layer_options_group_the_fields_by_layer():
    from rapa.analog.presets import layer_options, presets_by_layer

    assert layer_options("rpu-baseline", ("desired_bl=50", "conv1.desired_bl=100", "conv1.dw_min=1e-4",
                                          "fc.out_noise=0")) == {
        "": {"desired_bl": 50}, "conv1": {"desired_bl": 100, "dw_min": 1e-4}, "fc": {"out_noise": 0.0}}
    common, own = presets_by_layer("rpu-baseline", ("desired_bl=50", "out_noise=0", "conv1.desired_bl=100"))
    assert (common.desired_bl, common.out_noise) == (50, 0.0)
    assert set(own) == {"conv1"}
    assert (own["conv1"].desired_bl, own["conv1"].out_noise, own["conv1"].dw_min) == (100, 0.0, 0.00025)
    for item, message in [
        ("conv1.bl=3", "analog option 'conv1.bl=3': preset 'rpu-baseline' has no field 'bl'"),
        ("conv1.dw_min=-1", "analog option 'conv1.dw_min=-1': dw_min takes a finite number >= 0"),
        (".dw_min=3", "give LAYER.FIELD=VALUE"),
    ]:
        with pytest.raises(RapaError, match=re.escape(message)):
            layer_options("rpu-baseline", (item,))
    with pytest.raises(RapaError, match="conv1.desired_bl=4': desired_bl is given twice"):
        layer_options("rpu-baseline", ("conv1.desired_bl=3", "desired_bl=5", "conv1.desired_bl=4"))


@pytest.mark.analog
def test_eval_read_exact_is_the_net_of_the_arrays_weights(tmp_path, capsys, one_thread):
    """``rapa eval --read exact``: the errors of the paper's net computed by hand from the
    weights aihwkit reads off each array (``get_weights``), with F.conv2d and F.linear."""
    _aihwkit()
    from rapa.cli import main
    from rapa.config import TrainConfig
    from rapa.data import load_dataset, make_loader
    from rapa.train import load_run, train

    run = tmp_path / "run"
    train(TrainConfig(dataset="digits", analog="rpu-baseline", scheme="none", tiles=None, epochs=1,
                      limit_train=60, limit_test=200, channels=(4, 4, 4), device="cpu", votes=1, lr=0.05,
                      warmup_epochs=0), run, progress=False)
    assert main(["eval", str(run), "--read", "exact", "--device", "cpu", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["read"] == "analog"

    model, _, _ = load_run(run)
    x, y = next(iter(make_loader(load_dataset("digits", "test", limit=200), 200)))

    def conv(layer, h):
        (array,) = layer.analog_arrays()
        w, b = array.get_weights()  # (cout, cin*kh*kw), (cout,): aihwkit's own read-out
        return F.conv2d(h, w.view(layer.out_channels, layer.in_channels, *layer.kernel_size), b, padding=2)

    with torch.no_grad():
        h = model.norm1(model.pool1(F.relu(conv(model.conv1, x))))
        h = model.norm2(model.pool2(F.relu(conv(model.conv2, h))))
        h = model.pool3(F.relu(conv(model.conv3, h))).flatten(1)
        logits = F.linear(h, *model.fc.get_weights())
    expected = (logits.argmax(1) != y).float().mean().item()
    assert exact["read"] == "exact" and exact["single_error"] == pytest.approx(expected)
    assert exact["test_images"] == 200

    assert main(["eval", str(run), "--read", "exact", "--device", "cpu"]) == 0
    assert "rpu-baseline arrays read exactly" in capsys.readouterr().out
    digital = tmp_path / "digital"
    train(TrainConfig(dataset="digits", scheme="none", tiles=None, epochs=1, limit_train=20, limit_test=10,
                      channels=(4, 4, 4), device="cpu", votes=1), digital, progress=False)
    assert main(["eval", str(digital), "--read", "exact"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "trained in floating point" in err


# -------------------------------------------------------------------------------- benchmark


@pytest.mark.analog
def test_bench_analog_prints_the_ratio(capsys):
    _aihwkit()
    from rapa.cli import main

    assert main(["bench", "analog", "--size", "8", "--repeats", "1", "--preset", "ideal"]) == 0
    out = capsys.readouterr().out
    assert "ratio RAPA / untiled" in out and "AnalogConv2d" in out
    assert "pulses asked" not in out  # exact arrays: no pulses to count


@pytest.mark.analog
def test_bench_analog_says_how_many_pulses_each_net_asks_for(capsys, tmp_path):
    """Pulsed arrays: the pulses per update of both nets, layer by layer, counted on two more
    steps of batch 10 (so 20 FC updates, one per image; conv1 one per output pixel)."""
    _aihwkit()
    import json

    from rapa.cli import main

    path = tmp_path / "b.json"
    assert main(["bench", "analog", "--size", "8", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pulses asked per update, untiled -> RAPA" in out and "fc " in out
    pulses = json.loads(path.read_text())["pulses"]
    for net in ("untiled", "rapa"):
        assert set(pulses[net]) == {"conv1", "conv2", "conv3", "fc"}
        assert pulses[net]["fc"]["rows"] == 20
        assert pulses[net]["conv1"]["rows"] == 20 * 8 * 8


@pytest.mark.analog
def test_bench_analog_nets_start_as_rapa_train_analog_starts_them():
    """The benchmark times the nets `rapa train --analog` trains: LSUV-scaled (conv1's output
    has unit std on the images, computed here with F.conv2d from the arrays' weights) and
    the analog recipe's learning rates."""
    _aihwkit()
    from rapa.bench.analog import build_nets
    from rapa.config import ANALOG_LR_TILED, ANALOG_LR_UNTILED

    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    (untiled, opt_u), (rapa, opt_r) = build_nets("ideal", size=8, images=images)
    assert [g["lr"] for g in opt_u.param_groups] == [ANALOG_LR_UNTILED] * len(opt_u.param_groups)
    assert [g["lr"] for g in opt_r.param_groups] == [ANALOG_LR_TILED] * len(opt_r.param_groups)
    conv = untiled.conv1.conv  # aihwkit's AnalogConv2d
    weight, bias = conv.get_weights()
    y = F.conv2d(images, weight.view(conv.out_channels, 3, 5, 5), bias, padding=conv.padding)
    assert abs(y.std().item() - 1.0) < 0.05
    # without images the nets keep He's scale: conv1's output is not normalised
    (plain, _), _ = build_nets("ideal", size=8)
    w0, b0 = plain.conv1.conv.get_weights()
    y0 = F.conv2d(images, w0.view(conv.out_channels, 3, 5, 5), b0, padding=conv.padding)
    assert abs(y0.std().item() - 1.0) > 0.05


def test_digital_twin_of_an_analog_convnet_has_its_weights():
    _aihwkit()
    from rapa.analog import prepare
    from rapa.analysis.common import digital_twin, tiled_layers
    from rapa.analysis.similarity import filter_similarity
    from rapa.config import TrainConfig
    from rapa.models import ConvNet

    torch.manual_seed(0)
    model = ConvNet(in_channels=1, channels=(4, 4, 8), tiles=(16, 4, 1), image_size=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    analog, _ = prepare(model, TrainConfig(dataset="digits", analog="ideal"))
    analog.eval()
    twin = digital_twin(analog)
    assert [n for n, _ in tiled_layers(twin)] == ["conv1", "conv2"]
    assert isinstance(twin.fc, nn.Linear)
    # the twin holds the same weights as the digital model the analog one was made from
    for (_, a), (_, b) in zip(tiled_layers(twin), tiled_layers(model)):
        torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(twin.fc.weight, model.fc.weight, atol=1e-6, rtol=1e-5)
    assert filter_similarity(twin)["overall"] == pytest.approx(filter_similarity(model)["overall"], abs=1e-5)
    assert digital_twin(model) is model


# ----------------------------------------------------- grouped layers, padding modes (issue 17)


@pytest.mark.parametrize("kwargs,scheme,nt", [
    (dict(groups=2), "random", 4),
    (dict(groups=4, out_channels=4), "image_pad", 4),  # depthwise
    (dict(groups=4, out_channels=8), "perforated", 3),  # depthwise with a channel multiplier
    (dict(padding_mode="circular"), "random", 5),
    (dict(padding="same", padding_mode="reflect", kernel_size=(3, 2)), "alternate", 4),
    (dict(groups=2, padding="valid"), "none", 1),
    (dict(stride=2, dilation=(2, 1)), "random", 3),  # strided, dilated patches
    (dict(stride=(1, 2), kernel_size=(2, 3), padding=(1, 0)), "perforated", 2),
    (dict(channels_last=True), "random", 4),  # a channels-last input (gradient in its format)
])
@pytest.mark.analog
def test_ideal_analog_grouped_and_padded_layer_equals_digital(kwargs, scheme, nt):
    """Distinct replicas on ``ideal`` arrays reproduce the digital layer, forward and input
    gradient; one array per replica and group, of the group's kernel-matrix size."""
    _aihwkit()
    from rapa.analog import AnalogTiledConv2d

    torch.manual_seed(0)
    args = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, tiles=nt, scheme=scheme)
    channels_last = kwargs.pop("channels_last", False)
    args.update(kwargs)
    digital = TiledConv2d(**args)
    analog = AnalogTiledConv2d.from_tiled(digital, "ideal")
    groups = args.get("groups", 1)
    arrays = analog.analog_arrays()
    kh, kw = analog.kernel_size
    assert len(arrays) == digital.num_kernels * groups
    assert {tuple(a.get_weights()[0].shape) for a in arrays} == {(args["out_channels"] // groups,
                                                                   4 // groups * kh * kw)}
    weight, bias = analog.get_weights()
    torch.testing.assert_close(weight, digital.weight.detach())
    torch.testing.assert_close(bias, digital.bias.detach())
    x = torch.randn(2, 4, 6, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    index = digital.assignment(x)
    xd, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd, ya = digital(xd, index), analog(xa, index)
    torch.testing.assert_close(ya, yd, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yd)
    yd.backward(g)
    ya.backward(g)
    torch.testing.assert_close(xa.grad, xd.grad, atol=1e-5, rtol=1e-5)
    assert xa.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert analog.to_digital().groups == groups


@pytest.mark.analog
def test_convert_to_analog_takes_converted_modern_nets():
    """``convert_to_analog`` after ``rapa.convert`` on a depthwise-separable net: every conv
    layer on arrays (the skipped, untiled stem too), the same function on ``ideal`` arrays."""
    _aihwkit()
    import rapa
    from rapa.analog import AnalogTiledConv2d, convert_to_analog
    from rapa.nets import SeparableNet

    torch.manual_seed(1)
    net = SeparableNet(channels=(4, 8, 8), strides=(1, 2)).eval()
    rapa.convert(net, "balanced", input_size=(1, 8, 8), skip=["blocks.1.depthwise"])
    analog = convert_to_analog(net, "ideal")
    convs = [m for m in analog.modules() if isinstance(m, (nn.Conv2d, TiledConv2d))]
    assert not convs  # nothing digital left
    dw = analog.get_submodule("blocks.1.depthwise.0")  # a grouped nn.Conv2d: aihwkit cannot take it
    assert isinstance(dw, AnalogTiledConv2d) and dw.groups == 8 and dw.scheme == "none"
    x = torch.randn(2, 1, 8, 8)
    torch.manual_seed(2)
    yd = net(x)
    torch.manual_seed(2)  # the same random assignments
    torch.testing.assert_close(analog(x), yd, atol=1e-4, rtol=1e-4)


_BLAS_PROBE = """
import json, os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import rapa.analog.layers  # loads aihwkit's simulator, as every analog module does
from threadpoolctl import threadpool_info
sim = [i["num_threads"] for i in threadpool_info()
       if i["internal_api"] == "openblas" and "numpy" not in i["filepath"] and "scipy" not in i["filepath"]]
print(json.dumps({"sim": sim, "left": "OPENBLAS_NUM_THREADS" in os.environ}))
"""


@pytest.mark.analog
def test_simulator_blas_follows_torch_threads():
    """aihwkit's OpenBLAS sizes its pool when it loads (every core by default) and ignores
    torch.set_num_threads: rapa loads it with torch's count and leaves no variable behind;
    OPENBLAS_NUM_THREADS set by the user wins."""
    _aihwkit()
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: OpenBLAS uses one thread whatever is asked")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}

    def probe(threads: int, **extra: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _BLAS_PROBE, str(threads)], env={**env, **extra},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    for threads in (1, 2):
        got = probe(threads)
        if not got["sim"]:
            pytest.skip("aihwkit's simulator is not linked to a separate OpenBLAS here")
        assert got == {"sim": [threads], "left": False}
    assert probe(1, OPENBLAS_NUM_THREADS="2") == {"sim": [2], "left": True}


@pytest.mark.analog
def test_tile_lr_power_sets_each_array_its_rate():
    """With tile_lr_power p, AnalogSGD hands each replica array of a layer with nk replicas the
    rate lr * nk**p at its update, the untiled arrays (conv3, FC) lr; layer_lr_scale's factors
    multiply the named layers' rates."""
    _aihwkit()
    from rapa.config import TrainConfig
    from rapa.data import dataset_info
    from rapa.train import make_model_and_optimizer

    torch.manual_seed(0)
    config = TrainConfig(dataset="digits", scheme="random", tiles=(4, 2, 1), channels=(4, 4, 8),
                         analog="rpu-baseline", lr=0.01, tile_lr_power=1.0, init="he",
                         layer_lr_scale=("conv2=0.5", "fc=0.3")).resolved()
    model, opt = make_model_and_optimizer(config, dataset_info("digits"), "cpu")
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    rates = {"conv1": 0.04, "conv2": 0.01, "conv3": 0.01, "fc": 0.003}  # layer_lr_scale on top
    seen = 0
    for name, layer in model.named_children():
        for array in layer.analog_arrays() if hasattr(layer, "analog_arrays") else [layer]:
            for tile in getattr(array, "analog_tiles", lambda: [])():
                assert tile.get_learning_rate() == pytest.approx(rates[name]), name
                seen += 1
    assert seen == 4 + 2 + 1 + 1
