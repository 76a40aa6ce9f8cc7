"""LSUV rescaling (rapa.lsuv) and the trainer's ``init lsuv``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rapa import TiledConv2d
from rapa.config import TrainConfig
from rapa.errors import RapaError
from rapa.lsuv import lsuv_, lsuv_layers
from rapa.models import ConvNet


def _output_stds(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, float]:
    modules = dict(model.named_modules())
    seen: dict[str, float] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, float(o.std())))
               for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_one_linear_layer_gets_the_closed_form_factor():
    torch.manual_seed(0)
    layer = nn.Linear(30, 7, bias=False)
    x = torch.randn(200, 30) * 3.0 + 1.0
    w0 = layer.weight.detach().clone()
    factors = lsuv_(nn.Sequential(layer), x)
    expected = 1.0 / float(F.linear(x, w0).std())  # no bias: the output scales linearly, one step suffices
    assert factors == {"0": pytest.approx(expected, rel=1e-5)}
    torch.testing.assert_close(layer.weight, w0 * expected)


def test_every_layer_of_a_tiled_net_ends_at_unit_std_with_one_factor_per_layer():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(3)
    net = ConvNet(num_classes=10, in_channels=1, tiles=(4, 2, 1), scheme="random", image_size=16, init="he",
                  generator=g)
    x = torch.rand(64, 1, 16, 16) * 2 + 0.5  # positive-mean inputs: He's scale drifts with depth
    before = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("weight")}
    names = lsuv_layers(net)
    assert names == ["conv1", "conv2", "conv3", "fc"]
    factors = lsuv_(net, x, iters=5, tol=1e-3)
    g.manual_seed(3)  # a fresh draw of assignments for the check, as training would make
    stds = _output_stds(net, names, x)
    for name in names:
        assert stds[name] == pytest.approx(1.0, abs=0.08), name
        w = dict(net.named_parameters())[f"{name}.weight"]
        ratio = w / before[f"{name}.weight"]
        torch.testing.assert_close(ratio, torch.full_like(ratio, factors[name]), rtol=1e-4, atol=1e-6)
    assert net.training  # mode restored


def test_mode_is_restored_and_a_target_other_than_one():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(32, 2, 8, 8)
    lsuv_(net, x, target_std=0.5, iters=4, tol=1e-3)
    assert not net.training
    stds = _output_stds(net, ["0", "3"], x)
    assert stds["0"] == pytest.approx(0.5, rel=1e-3)
    assert stds["3"] == pytest.approx(0.5, rel=0.05)


def test_tiled_conv_layer_alone():
    torch.manual_seed(4)
    layer = TiledConv2d(3, 5, 3, padding=1, tiles=4, scheme="random")
    x = torch.randn(8, 3, 10, 10) + 2.0
    w0 = layer.weight.detach().clone()
    (factor,) = lsuv_(nn.Sequential(layer), x, iters=6, tol=1e-4).values()
    torch.testing.assert_close(layer.weight, w0 * factor)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_std": 0}, "target_std=0"),
    ({"iters": 0}, "iters=0"),
    ({"layers": ["nope"]}, "nope"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    net = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=match):
        lsuv_(net, torch.randn(5, 4), **kwargs)


def test_one_image_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        lsuv_(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4))


def test_config_accepts_lsuv_and_names_the_choices_otherwise():
    TrainConfig(dataset="digits", init="lsuv").validate()
    with pytest.raises(RapaError, match="'xavier'.*caffe, he, lsuv"):
        TrainConfig(dataset="digits", init="xavier").validate()


def test_training_with_lsuv_rescales_before_the_first_step(tmp_path):
    from rapa.train import make_model_and_optimizer, load_data, train

    config = TrainConfig(dataset="digits", epochs=1, limit_train=200, limit_test=100, scheme="random",
                         tiles=(4, 2, 1), init="lsuv", lr=0.01, warmup_epochs=0, seed=0)
    train_data, _, info = load_data(config.resolved())
    torch.manual_seed(0)
    he, _ = make_model_and_optimizer(config.resolved(), info, "cpu")  # no data: He's weights
    torch.manual_seed(0)
    rescaled, _ = make_model_and_optimizer(config.resolved(), info, "cpu", train_data)
    for name in ("conv1", "conv2", "conv3", "fc"):
        w_he = getattr(he, name).weight.detach()
        w = getattr(rescaled, name).weight.detach()
        factor = float((w.flatten()[0] / w_he.flatten()[0]))
        assert factor != pytest.approx(1.0, abs=1e-3), name  # every layer was rescaled ...
        torch.testing.assert_close(w, w_he * factor, rtol=1e-4, atol=1e-7)  # ... by one factor
    summary = train(config, tmp_path / "run", progress=False)
    assert 0.0 <= summary["final_test_error"] <= 1.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init"] == "lsuv"
