"""Small modern ConvNets beyond the paper's, for :func:`rapa.convert` (issue 17's demonstration).

Built from plain ``nn.Conv2d`` layers, as a user's model would be, and converted with
``rapa.convert(net, tiles="balanced", input_size=...)``:

* :class:`ResidualNet`: a small ResNet (He et al. 2016): a 3x3 stem, then one stage of
  ``blocks`` basic residual blocks per entry of ``channels`` (BatchNorm, ReLU; the first
  block of every later stage has stride 2 and a 1x1 projection shortcut), global average
  pooling and a linear classifier.
* :class:`SeparableNet`: a small MobileNet-style net (Howard et al. 2017): a 3x3 stem, then
  depthwise-separable blocks (3x3 depthwise conv, ``groups = channels``, BatchNorm, ReLU;
  1x1 pointwise conv, BatchNorm, ReLU), global average pooling and a linear classifier.

Convolutions before a BatchNorm have no bias (the BatchNorm's shift replaces it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn
from torch import Tensor


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _check(name: str, values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name}={values!r} must be one or more positive integers")
    return out


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``; the shortcut is a 1x1
    conv + BatchNorm where the stride or the channels change, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, relu=False)
        self.shortcut = _conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResidualNet(nn.Module):
    """A small ResNet: stem conv ``in_channels -> channels[0]``, ``blocks`` basic blocks per
    stage (stage ``i > 0`` starts with stride 2), average pooling, linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64),
                 blocks: int = 1) -> None:
        super().__init__()
        self.channels = _check("channels", channels)
        _check("blocks", [blocks])
        _check("num_classes/in_channels", [num_classes, in_channels])
        self.stem = _conv_bn(in_channels, self.channels[0], 3)
        stages: list[nn.Module] = []
        cin = self.channels[0]
        for i, c in enumerate(self.channels):
            stage = [BasicBlock(cin if j == 0 else c, c, 2 if i > 0 and j == 0 else 1) for j in range(blocks)]
            stages.append(nn.Sequential(*stage))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 conv (``groups = cin``) + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = _conv_bn(cin, cin, 3, stride, groups=cin)
        self.pointwise = _conv_bn(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class SeparableNet(nn.Module):
    """A small MobileNet-style net: stem conv ``in_channels -> channels[0]``, one
    depthwise-separable block ``channels[i] -> channels[i+1]`` with ``strides[i]`` each,
    average pooling, linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 channels: Sequence[int] = (16, 32, 64, 64, 128), strides: Sequence[int] = (1, 2, 1, 2)) -> None:
        super().__init__()
        self.channels = _check("channels", channels)
        self.strides = _check("strides", strides)
        _check("num_classes/in_channels", [num_classes, in_channels])
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides={tuple(strides)} needs {len(self.channels) - 1} entries, one per block")
        self.stem = _conv_bn(in_channels, self.channels[0], 3)
        self.blocks = nn.Sequential(*(SeparableBlock(a, b, s) for a, b, s in
                                      zip(self.channels, self.channels[1:], self.strides)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


NETS: dict[str, type[nn.Module]] = {"resnet": ResidualNet, "separable": SeparableNet}
"""The modern nets by name."""


def build_net(name: str, **kwargs: Any) -> nn.Module:
    """A net of :data:`NETS` (untiled: plain ``nn.Conv2d`` layers) with its keyword arguments;
    ``ValueError`` naming an unknown ``name``."""
    if name not in NETS:
        raise ValueError(f"net={name!r} is unknown; choose one of {', '.join(NETS)}")
    return NETS[name](**kwargs)
