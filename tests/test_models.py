"""The paper's ConvNet against an nn.Conv2d reference net, Caffe's counts and init (SPEC §2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rapa
from rapa.convert import conv_output_pixels
from rapa.models import ENLARGED_CHANNELS, ConvNet, build_model
from rapa.pooling import MixedPool2d, StochasticPool2d

GRID_OR_RANDOM = ("none", "random", "random_fixed", "alternate", "image_overlap", "perforated")


class _ReferenceNet(nn.Module):
    """cifar10_full with ReLU from torch built-ins; LRN and average pooling written as convolutions."""

    def __init__(self, channels, in_channels=3, num_classes=10, image_size=32, pooling="max"):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.conv3 = nn.Conv2d(c2, c3, 5, padding=2)
        f = image_size
        for _ in range(3):
            f = -(-f // 2)
        self.fc = nn.Linear(c3 * f * f, num_classes)
        self.pooling = pooling

    @staticmethod
    def _avg(x):  # window sum / number of in-image pixels of the window (Caffe AVE without padding)
        c = x.shape[1]
        ones = torch.ones(c, 1, 3, 3, dtype=x.dtype)
        total = F.conv2d(x, ones, stride=2, padding=1, groups=c)
        count = F.conv2d(torch.ones_like(x[:, :1]), ones[:1], stride=2, padding=1)
        return total / count

    @staticmethod
    def _lrn(x, alpha=5e-5, beta=0.75):
        c = x.shape[1]
        mean_sq = F.conv2d(x * x, torch.full((c, 1, 3, 3), 1 / 9, dtype=x.dtype), padding=1, groups=c)
        return x / (1 + alpha * mean_sq) ** beta

    def _pool(self, x):
        return F.max_pool2d(x, 3, 2, 1) if self.pooling == "max" else self._avg(x)

    def forward(self, x):
        x = self._lrn(self._pool(F.relu(self.conv1(x))))
        x = self._lrn(self._pool(F.relu(self.conv2(x))))
        x = self._avg(F.relu(self.conv3(x)))
        return self.fc(x.flatten(1))


def _copy_into(net: ConvNet, ref: _ReferenceNet) -> None:
    with torch.no_grad():
        for layer, conv in zip(net.convs, (ref.conv1, ref.conv2, ref.conv3)):
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight))  # identical tiles
            layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias))
        net.fc.load_state_dict(ref.fc.state_dict())


@pytest.mark.parametrize("scheme", GRID_OR_RANDOM)
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_identical_tiles_equal_reference_net(scheme, pooling):
    torch.manual_seed(0)
    ref = _ReferenceNet((8, 8, 16), pooling=pooling).double()
    net = ConvNet(channels=(8, 8, 16), tiles=(16, 4, 1), scheme=scheme, pooling=pooling, dtype=torch.float64)
    _copy_into(net, ref)
    net.eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x))


def test_image_pad_differs_from_reference_net():
    torch.manual_seed(0)
    ref = _ReferenceNet((8, 8, 16)).double()
    net = ConvNet(channels=(8, 8, 16), tiles=(16, 4, 1), scheme="image_pad", dtype=torch.float64).eval()
    _copy_into(net, ref)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert not torch.allclose(net(x), ref(x))


def test_untiled_equals_reference_on_28x28_grey():
    torch.manual_seed(1)
    ref = _ReferenceNet((8, 8, 16), in_channels=1, image_size=28).double()
    net = ConvNet(in_channels=1, channels=(8, 8, 16), tiles=None, image_size=28, dtype=torch.float64)
    _copy_into(net, ref)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x))


@pytest.mark.parametrize("pooling", ["max", "avg", "stochastic", "mixed"])
@pytest.mark.parametrize("shape,kw", [((3, 32, 32), {}), ((1, 28, 28), dict(in_channels=1, image_size=28))])
def test_output_shapes(pooling, shape, kw):
    net = ConvNet(num_classes=7, pooling=pooling, **kw)
    assert net.fc.in_features == 64 * 4 * 4
    for training in (True, False):
        net.train(training)
        assert net(torch.randn(2, *shape)).shape == (2, 7)


def test_pool_kinds_are_used():
    net = ConvNet(pooling="mixed")
    assert isinstance(net.pool1, MixedPool2d) and net.pool1.num_channels == 32
    assert isinstance(net.pool2, MixedPool2d) and net.pool2.num_channels == 32
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert net.pool1.beta.grad is not None and net.pool1.beta.grad.abs().sum() > 0
    assert isinstance(ConvNet(pooling="stochastic").pool2, StochasticPool2d)
    assert isinstance(ConvNet(pooling="stochastic").pool3, nn.AvgPool2d)


def test_conv_weight_counts_are_exact():
    assert ConvNet(tiles=None).conv_weight_count() == 79_328
    assert ConvNet(tiles=(16, 4, 1), scheme="random").conv_weight_count() == 192_704
    assert ConvNet.enlarged().conv_weight_count() == 193_032
    assert ConvNet(channels=ENLARGED_CHANNELS, tiles=None).conv_weight_count() == 193_032
    assert ConvNet(tiles=(16, 4, 1), scheme="none").conv_weight_count() == 79_328  # forced to 1 tile
    assert ConvNet(tiles=(16, 4, 1), scheme="perforated").conv_weight_count() == 79_328  # one kernel


def test_output_pixels_match_a_forward_pass():
    net = ConvNet()
    assert net.output_pixels == (1024, 256, 64)
    assert tuple(conv_output_pixels(net, (3, 32, 32)).values()) == (1024, 256, 64)
    assert ConvNet(in_channels=1, image_size=28).output_pixels == (784, 196, 49)


def test_caffe_initialisation():
    net = ConvNet(tiles=(16, 4, 1), pooling="mixed", generator=torch.Generator().manual_seed(0))
    for layer, std in zip(net.convs, (1e-4, 0.01, 0.01)):
        assert layer.weight.std().item() == pytest.approx(std, rel=0.05)
        assert abs(layer.weight.mean().item()) < 0.05 * std
        assert torch.all(layer.bias == 0)
        assert not torch.equal(layer.weight[0], layer.weight[-1]) or layer.num_kernels == 1
    assert net.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(net.fc.bias == 0)
    torch.testing.assert_close(net.pool1.beta, torch.full((32,), 0.2))


@torch.no_grad()
def _untiled_reference(net: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """``net``'s function computed with ``F.conv2d`` and each layer's first tile only."""
    for layer, pool, norm in ((net.conv1, net.pool1, net.norm1), (net.conv2, net.pool2, net.norm2),
                              (net.conv3, net.pool3, nn.Identity())):
        x = norm(pool(F.relu(F.conv2d(x, layer.weight[0], layer.bias[0], padding=2))))
    return net.fc(x.flatten(1))


@pytest.mark.parametrize("init", ["caffe", "he"])
@torch.no_grad()
def test_replicated_tiles_start_as_the_untiled_net(init):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    net = ConvNet(tiles=(16, 4, 1), init=init, tile_init="replicate", generator=torch.Generator().manual_seed(1))
    independent = ConvNet(tiles=(16, 4, 1), init=init, generator=torch.Generator().manual_seed(1))
    for layer, other in zip(net.convs, independent.convs):
        assert all(torch.equal(w, layer.weight[0]) for w in layer.weight)
        assert layer.num_kernels == 1 or not torch.equal(other.weight[0], other.weight[-1])
    expected = _untiled_reference(net, x)
    for _ in range(2):  # two draws of the random assignment: the same function as the untiled net
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(independent(x), _untiled_reference(independent, x), rtol=1e-2)
    with pytest.raises(ValueError, match="tile_init='shared' is unknown"):
        ConvNet(tile_init="shared")


def test_generator_makes_construction_repeatable():
    a = ConvNet(generator=torch.Generator().manual_seed(3))
    b = ConvNet(generator=torch.Generator().manual_seed(3))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_random_scheme_redraws_in_eval_and_random_fixed_does_not():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    for scheme, same in (("random", False), ("random_fixed", True)):
        net = ConvNet(scheme=scheme).eval()
        with torch.no_grad():
            for layer in net.convs:
                layer.weight.normal_(0, 0.1)
        assert torch.equal(net(x), net(x)) == same


@pytest.mark.parametrize("kw,match", [
    (dict(tiles=(16, 4)), r"tiles=\(16, 4\)"),
    (dict(tiles=(8, 4, 1), scheme="alternate"), "conv1 has 8 tiles"),
    (dict(tiles=(16, 2, 1), scheme="image_pad"), "conv2 has 2 tiles"),
    (dict(tiles=(2048, 4, 1)), "2048 tiles but only 1024"),
    (dict(tiles=(16, 4, 64), image_size=28, in_channels=1), "64 tiles but only 49"),
    (dict(pooling="median"), "pooling='median'"),
    (dict(scheme="bogus"), "scheme='bogus'"),
    (dict(channels=(32, 32)), r"channels=\(32, 32\)"),
    (dict(channels=(32, 0, 64)), "channels"),
    (dict(image_size=0), "image_size=0"),
    (dict(num_classes=0), "num_classes=0"),
])
def test_invalid_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ConvNet(**kw)


def test_wrong_input_size_raises():
    with pytest.raises(ValueError, match="image_size"):
        ConvNet()(torch.randn(1, 3, 28, 28))


def test_forward_takes_per_layer_indices():
    torch.manual_seed(4)
    net = ConvNet(channels=(4, 4, 8), tiles=(4, 4, 1), dtype=torch.float64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    indices = [layer.assignment(torch.empty(2, layer.in_channels, s, s, dtype=torch.float64))
               for layer, s in zip(net.convs, (32, 16, 8))]
    torch.testing.assert_close(net(x, indices), net(x, indices))
    with pytest.raises(ValueError, match="indices"):
        net(x, indices[:2])


def test_build_model():
    assert build_model({"channels": "enlarged", "tiles": "none"}).conv_weight_count() == 193_032
    assert build_model(tiles="paper").conv_weight_count() == 192_704
    assert build_model({"pooling": "avg"}, num_classes=100).fc.out_features == 100
    with pytest.raises(ValueError, match="lr"):
        build_model({"lr": 0.1})
