"""The compensatory measures of the analog arrays act (``rapa.analog.mapping``, SPEC §5).

Rasch, Gokmen & Haensch 2019 (arXiv 1906.02698): noise management, bound management,
update management and weight scaling. Each test checks what the measure is for against an
independent reference (the exact digital product ``W x``, the SGD update ``lr * d x^T``) and,
where it helps to show the test can fail, the same arrays without the measure.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.analog

aihwkit = pytest.importorskip("aihwkit")

from aihwkit.nn import AnalogLinear  # noqa: E402
from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType  # noqa: E402
from aihwkit.simulator.tiles.analog import AnalogTile  # noqa: E402

from rapa.analog import convert_to_analog, get_preset, manual_seed  # noqa: E402
from rapa.analog.mapping import ManagedAnalogTile  # noqa: E402


def _quiet_device(**overrides):
    """rpu-baseline without device-to-device variation (exact bounds), for arithmetic checks."""
    fields = dict(dw_min_dtod=0.0, w_max_dtod=0.0, up_down_dtod=0.0)
    fields.update(overrides)
    return get_preset("rpu-baseline", **fields)


def _linear(weight: torch.Tensor, preset, seed: int = 1) -> AnalogLinear:
    layer = AnalogLinear(weight.shape[1], weight.shape[0], bias=False, rpu_config=preset.rpu_config(seed))
    layer.set_weights(weight, None)
    return layer


def _tile(layer: nn.Module):
    return next(m for m in layer.modules() if isinstance(m, AnalogTile))


def _snr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (y - ref).norm()))


# ------------------------------------------------------------------------------ the one mapping


@pytest.mark.parametrize("name", ["rpu-baseline", "idealized", "aihwkit:GokmenVlasovPreset"])
def test_every_pulsed_preset_goes_through_the_mapping(name):
    preset = get_preset(name)
    config = preset.rpu_config(7)
    assert config.mapping.max_input_size == 0 and config.mapping.max_output_size == 0
    assert config.mapping.weight_scaling_omega == pytest.approx(preset.weight_range * config.device.w_max)
    assert config.mapping.weight_scaling_omega > 0
    assert config.tile_class is ManagedAnalogTile
    # noise management (abs-max), iterative bound management and update management asked for
    assert config.forward.noise_management == NoiseManagementType.ABS_MAX
    assert config.backward.noise_management == NoiseManagementType.ABS_MAX
    assert config.forward.bound_management == BoundManagementType.ITERATIVE
    assert config.update.update_management and config.update.update_bl_management


def test_ideal_preset_has_no_range_to_fill():
    config = get_preset("ideal").rpu_config()
    assert config.mapping.weight_scaling_omega == 0 and config.mapping.max_input_size == 0


# ------------------------------------------------------------------------------ weight scaling


def test_weight_scaling_puts_tiny_weights_on_the_device_range():
    """Caffe's conv1 (std 1e-4) is below one device step (2.5e-4): written 1:1 its output is
    noise; scaled, every array holds its largest weight at omega and the output is W x."""
    manual_seed(0)
    w = torch.randn(32, 75) * 1e-4  # (cout, k): conv1 of the paper's net on RGB
    x = torch.rand(400, 75)  # patches of a [0, 1] image
    ref = x @ w.t()
    scaled = _linear(w, _quiet_device())
    raw = _tile(scaled).tile.get_weights()
    omega = scaled.analog_module.rpu_config.mapping.weight_scaling_omega
    assert raw.abs().max().item() == pytest.approx(omega, rel=1e-5)
    logical, _ = scaled.get_weights()
    torch.testing.assert_close(logical, w, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        assert _snr_db(scaled(x), ref) > 15  # ~ the converters' resolution
        unscaled = _linear(w, _quiet_device(weight_range=0.0))
        assert _snr_db(unscaled(x), ref) < 0  # the old 1:1 mapping: more noise than signal


def test_weight_scaling_keeps_sgd_on_the_logical_weights():
    """The pulsed update of a scaled array changes the logical weights by ``-lr * d x^T`` on
    average (aihwkit divides ``d`` by the digital scale before the update), as long as the
    update fits the pulse train (31 pulses of ``dw_min``)."""
    manual_seed(0)
    w = torch.randn(16, 64) * 1e-3
    preset = _quiet_device(dw_min=1e-4, dw_min_std=0.0)
    layer = _linear(w, preset)
    from aihwkit.optim import AnalogSGD

    lr = 0.05
    opt = AnalogSGD(layer.parameters(), lr=lr)
    opt.regroup_param_groups(layer)
    x = torch.rand(1, 64)
    d = torch.randn(1, 16) * 1e-4  # a few device steps per update (at most 31: the pulse train)
    before, _ = layer.get_weights()
    steps = 40
    for _ in range(steps):
        opt.zero_grad()
        (layer(x) * d).sum().backward()  # dL/dy = d
        opt.step()
    after, _ = layer.get_weights()
    expected = -lr * steps * d.t() @ x  # (16, 64)
    got = after - before
    slope = float((got * expected).sum() / (expected * expected).sum())
    assert 0.8 < slope < 1.25, slope
    assert float(F.cosine_similarity(got.flatten(), expected.flatten(), dim=0)) > 0.9


# ------------------------------------------------------------------ noise and bound management


def test_noise_management_reads_small_inputs():
    """Abs-max noise management scales the input to the DAC's range: inputs far below one DAC
    step (1/126) are still read (without it the DAC rounds them to zero)."""
    manual_seed(0)
    w = torch.randn(32, 128) * 0.1
    x = torch.rand(64, 128) * 2e-3
    ref = x @ w.t()
    with torch.no_grad():
        assert _snr_db(_linear(w, _quiet_device())(x), ref) > 15
        preset = _quiet_device()
        config = preset.rpu_config(1)
        config.forward.noise_management = NoiseManagementType.NONE
        layer = AnalogLinear(128, 32, bias=False, rpu_config=config)
        layer.set_weights(w, None)
        assert _snr_db(layer(x), ref) < 3


def test_bound_management_recomputes_saturated_outputs():
    """Outputs far beyond the ADC bound (12) come back as W x, not clipped at the bound: the
    iterative bound management recomputes them with a reduced input."""
    manual_seed(0)
    w = torch.rand(8, 512) * 0.3 + 0.2  # all positive: every output ~ 0.35 * sum(x) >> 12
    x = torch.rand(32, 512)
    ref = x @ w.t()
    assert ref.min() > 40
    with torch.no_grad():
        y = _linear(w, _quiet_device())(x)
        assert _snr_db(y, ref) > 15
        config = _quiet_device().rpu_config(1)
        config.forward.bound_management = BoundManagementType.NONE
        layer = AnalogLinear(512, 8, bias=False, rpu_config=config)
        layer.set_weights(w, None)
        assert _snr_db(layer(x), ref) < 3  # clipped at the bound


def test_gradient_passes_through_outputs_beyond_the_old_bound():
    """aihwkit's tile zeroes the gradient of every output that reaches out_bound * 0.999
    (~12), although noise and bound management rescaled it and nothing was clipped; the
    managed tile passes the whole ``d W`` (the reference) back."""
    manual_seed(0)
    w = torch.randn(10, 256) * 0.1
    x = torch.randn(200, 256) * 20  # logits of std ~32: most beyond 12 (200 rows: stable cosines)
    preset = _quiet_device()
    for tile_class in (ManagedAnalogTile, AnalogTile):
        config = preset.rpu_config(1)
        config.tile_class = tile_class
        layer = AnalogLinear(256, 10, bias=False, rpu_config=config)
        layer.set_weights(w, None)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        beyond = y.detach().abs() >= 12 * 0.999
        assert beyond.float().mean() > 0.5
        d = torch.randn_like(y)
        (y * d).sum().backward()
        whole = F.cosine_similarity(xi.grad.flatten(), (d @ w).flatten(), dim=0)
        masked = F.cosine_similarity(xi.grad.flatten(), ((d * ~beyond) @ w).flatten(), dim=0)
        if tile_class is ManagedAnalogTile:
            assert whole > 0.8 and masked < 0.65, (whole, masked)  # ~0.88-0.92 vs ~0.46-0.51
        else:  # aihwkit's own tile: the gradient of every output beyond 12 dropped
            assert masked > whole + 0.1, (whole, masked)  # ~0.71-0.79 vs ~0.50-0.54


# -------------------------------------------------------- training the paper's net on the arrays


def _arrays(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AnalogLinear):
            out[name] = m.get_weights()[0].clone()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tiles", [None, (16, 4, 1)])
def test_first_50_steps_move_every_array_and_the_fc_gradient_flows(tiles, one_thread):
    from rapa.data import load_dataset, make_loader
    from rapa.models import ConvNet
    from rapa.analog import analog_optimizer

    manual_seed(0)
    net = ConvNet(10, 1, tiles=tiles, scheme="random" if tiles else "none", image_size=28, init="he")
    model = convert_to_analog(net, "rpu-baseline")
    optimizer = analog_optimizer(model, lr=0.025 if tiles else 0.01)
    start = _arrays(model)
    assert len(start) == (22 if tiles else 4)  # every replica and the FC layer: one array each
    data = load_dataset("digits", "train", limit=500)
    loader = make_loader(data, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == 50:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    end = _arrays(model)
    unchanged = [name for name in start if torch.equal(start[name], end[name])]
    assert not unchanged, unchanged
    # logits pushed well past the old bound (the FC's input scaled so that the median logit
    # is about 60, 5x the bound; the simulator's noise is clock-seeded, so the factor is
    # measured rather than fixed): the FC still passes a gradient
    x, y = next(iter(loader))
    with torch.no_grad():
        factor = 60.0 / float(model(x).abs().median().clamp_min(1e-3))
    factor = max(factor, 1.0)
    seen: list[torch.Tensor] = []

    def amplify(module: nn.Module, inputs: tuple) -> tuple:
        scaled = inputs[0] * factor
        scaled.retain_grad()
        seen.append(scaled)
        return (scaled,)

    model.fc.register_forward_pre_hook(amplify)
    logits = model(x)
    assert (logits.abs() > 12).float().mean() > 0.5, (factor, logits.abs().median())
    (logits * torch.randn_like(logits)).sum().backward()  # d = dL/dlogits: no saturating softmax
    assert (seen[0].grad.abs().sum(dim=1) > 0).all()  # aihwkit's mask would zero these rows


# ------------------------------------------------------------------------------ bad input


def _rapa(*args: str, tmp_path) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rapa.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("preset, says", [
    ("nope", "analog preset 'nope' is unknown"),
    ("aihwkit:NoSuchPreset", "analog preset 'aihwkit:NoSuchPreset' is unknown"),
])
def test_train_with_an_unknown_preset_says_so_in_one_line(preset, says, tmp_path):
    out = _rapa("train", "--dataset", "digits", "--epochs", "1", "--limit-train", "20", "--limit-test", "10",
                "--analog", preset, "--out", str(tmp_path / "run"), "--quiet", tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_analog_on_cuda_without_a_cuda_simulator_is_a_user_error(monkeypatch):
    """aihwkit built without CUDA (as here): --analog with a CUDA device is refused before
    anything runs, naming the device and what to do."""
    from aihwkit.simulator.rpu_base import cuda

    from rapa.config import TrainConfig
    from rapa.errors import RapaError

    if cuda.is_compiled():
        pytest.skip("this aihwkit simulates on CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    with pytest.raises(RapaError, match=r"device 'cuda'.*built without CUDA.*--device cpu"):
        TrainConfig(dataset="digits", analog="rpu-baseline", device="cuda").validate()
    TrainConfig(dataset="digits", device="cuda").validate()  # digital training may use it
