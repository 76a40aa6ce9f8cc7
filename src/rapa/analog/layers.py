"""``AnalogTiledConv2d``: a RAPA convolution whose every replica is its own analog array.

Each of the ``nk`` kernel matrices ``K_j`` (``k x cout``, ``k = cin*kh*kw``) lives on a
separate aihwkit ``AnalogLinear`` tile with its own converters and noise (SPEC §5). A grouped
layer (``groups > 1``, depthwise: ``groups == cin``) has one ``k/groups x cout/groups``
matrix per replica and group, each its own array: ``nk * groups`` arrays, replica ``j``'s
group ``g`` at index ``j * groups + g``. Padding modes and padding strings are applied to
the input first, as ``nn.Conv2d`` does. The layer shares :class:`rapa.tiled_conv.TiledConvBase`
with the digital :class:`rapa.TiledConv2d` (arguments, assignment, plan: the same schemes,
draws and cache), and the forward pass gathers the patches of every tile with the digital
layer's patch plan (:func:`rapa.ops.patches.gather_patches`), sends tile ``j``'s ``(N*M, k)``
patch matrix through array ``j`` (forward, backward and pulsed update are aihwkit's, the
update happens in :class:`aihwkit.optim.AnalogSGD`'s ``step``) and scatters the outputs
back. The loop over the arrays is the only Python loop: each iteration is one array's whole
batch of matrix-vector products.
"""

from __future__ import annotations

from typing import Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from rapa.analog.backend import draw_construction_seed, require_aihwkit

require_aihwkit()  # loads aihwkit's simulator with its BLAS threads sized (rapa.analog.backend)
from aihwkit.nn import AnalogLinear
from torch import Tensor

from rapa import schemes
from rapa.analog.presets import AnalogPreset, get_preset
from rapa.functional import _size2, pad_input
from rapa.ops.geometry import ConvGeometry
from rapa.ops.patches import gather_patches
from rapa.tiled_conv import TiledConv2d, TiledConvBase


class AnalogTiledConv2d(TiledConvBase):
    """:class:`rapa.TiledConv2d` on simulated analog arrays, one ``AnalogLinear`` per replica.

    Arguments as :class:`rapa.TiledConv2d`, plus ``preset`` (a name of
    :data:`rapa.analog.PRESETS`, ``aihwkit:CLASS`` or an :class:`AnalogPreset`) and
    ``construction_seeds`` (one non-zero seed per array for its device-to-device
    variations; default: drawn from ``generator`` / torch's generator). The arrays are
    ``self.arrays[j * groups + g]``; read and write their weights with :meth:`get_weights` /
    :meth:`set_weights`, which use the digital layer's shapes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size2,
        stride: _size2 = 1,
        padding: _size2 | str = 0,
        dilation: _size2 = 1,
        bias: bool = True,
        tiles: int = 1,
        scheme: str = "random",
        preset: str | AnalogPreset = "rpu-baseline",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        construction_seeds: Sequence[int] | None = None,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, tiles, scheme,
                         generator, groups, padding_mode)
        if dtype not in (None, torch.float32):
            raise ValueError(f"dtype={dtype}: the analog simulator computes in float32")
        self.preset = get_preset(preset)
        self.has_bias = bool(bias)
        nk = schemes.num_kernels(scheme, tiles)
        if construction_seeds is None:
            construction_seeds = [draw_construction_seed(generator) for _ in range(nk * groups)]
        if len(construction_seeds) != nk * groups:
            raise ValueError(f"construction_seeds has {len(construction_seeds)} entries; the layer has "
                             f"{nk * groups} arrays")
        self.k = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]  # rows per array
        self.arrays = nn.ModuleList(
            AnalogLinear(self.k, out_channels // groups, bias, rpu_config=self.preset.rpu_config(int(seed)))
            for seed in construction_seeds
        )
        self._init_assignment("cpu")
        if device is not None and torch.device(device).type == "cuda":
            self.arrays.cuda(torch.device(device))

    def analog_arrays(self) -> list[AnalogLinear]:
        """The ``nk * groups`` arrays, replica ``j``'s group ``g`` at index ``j * groups + g``."""
        return [cast(AnalogLinear, array) for array in self.arrays]

    @property
    def num_kernels(self) -> int:
        """Number of replicas held (each ``groups`` arrays)."""
        return len(self.arrays) // self.groups

    def _has_bias(self) -> bool:
        return self.has_bias

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default initialisation, drawn independently for every array."""
        for array in self.analog_arrays():  # per array: init is not a hot path
            array.reset_parameters()

    @torch.no_grad()
    def get_weights(self) -> tuple[Tensor, Tensor | None]:
        """Weights ``(nk, cout, cin/groups, kh, kw)`` and biases ``(nk, cout)`` (or ``None``) as
        stored on the arrays (an exact, not a hardware-realistic, read-out; on CPU)."""
        ws, bs = zip(*(array.get_weights() for array in self.analog_arrays()))  # (cout/groups, k) each
        weight = torch.stack(ws).view(self.num_kernels, self.out_channels, self.in_channels // self.groups,
                                      *self.kernel_size)
        return weight, (torch.stack(bs).view(self.num_kernels, self.out_channels) if self.has_bias else None)

    @torch.no_grad()
    def set_weights(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Program every array with its rows of ``weight[j]`` (``(nk, cout, cin/groups, kh, kw)``)
        and ``bias[j]`` (exact write; a pulsed device clips to its bounds)."""
        shape = (self.num_kernels, self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)}: expected {shape}")
        if self.has_bias and (bias is None or tuple(bias.shape) != shape[:2]):
            raise ValueError(f"bias must have shape {shape[:2]}, got "
                             f"{None if bias is None else tuple(bias.shape)}")
        og = self.out_channels // self.groups
        w = weight.detach().cpu().float().reshape(-1, og, self.k)  # (nk*groups, cout/groups, k)
        b = bias.detach().cpu().float().reshape(-1, og) if bias is not None and self.has_bias else None
        for j, array in enumerate(self.analog_arrays()):
            array.set_weights(w[j], None if b is None else b[j])

    def _apply_arrays(self, cols: Tensor, replica: int) -> Tensor:
        """Replica ``replica``'s arrays on patches ``cols`` (L, cin*kh*kw) in ``(C, kh, kw)``
        order: group ``g`` reads its channels' entries; outputs ``(L, cout)``."""
        arrays = self.analog_arrays()[replica * self.groups:(replica + 1) * self.groups]
        if self.groups == 1:
            return arrays[0](cols)
        return torch.cat([array(part) for array, part in zip(arrays, cols.split(self.k, dim=1))], 1)

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Apply the layer to ``x`` (N, C, H, W) or (C, H, W); ``index`` (B, nt, M) overrides
        the scheme's assignment."""
        if x.dim() == 3:  # unbatched, as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0), index).squeeze(0)
        n, _, h, w = x.shape
        tp = self.plan(x, index)
        oh, ow = self.output_size(h, w)
        np_, cout = oh * ow, self.out_channels
        x, padding = pad_input(x, self.padding, self.padding_mode, self.kernel_size, self.stride, self.dilation)
        if tp.index is None:  # one array (per group) for every pixel: an ordinary analog convolution
            cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)  # (N, k, np)
            y = self._apply_arrays(cols.transpose(1, 2).reshape(n * np_, -1), 0)  # (N*np, cout)
            return y.view(n, np_, cout).transpose(1, 2).reshape(n, cout, oh, ow)
        if tp.index.shape[1] != self.num_kernels:
            raise ValueError(f"index has {tp.index.shape[1]} tiles; the layer has {self.num_kernels} replicas")
        geo = ConvGeometry(n, self.in_channels, x.shape[2], x.shape[3], self.kernel_size, self.stride, padding,
                           self.dilation, (oh, ow), self.num_kernels, cout, tp.index.shape[0], tp.index.shape[2])
        cols, slot = gather_patches(x, tp.index, geo, tp.mask, tp.covered)  # (nt, N*M, k), (N*np,)
        # unbind, not cols[j]: the gradient of nt selects would be nt zero-filled (nt, N*M, k)
        # tensors added up; unbind's is one stack of the arrays' input gradients
        y = torch.cat([self._apply_arrays(c, j)  # (N*M, cout): the replica's whole batch
                       for j, c in enumerate(cols.unbind(0))])  # (nt*N*M, cout)
        if not tp.covered:  # pixels without a slot read a zero row
            y = torch.cat([y, y.new_zeros(1, cout)])
        out = y.index_select(0, slot)  # (N*np, cout): back to pixel order
        return out.view(n, oh, ow, cout).permute(0, 3, 1, 2)  # (N, cout, oh, ow)

    @classmethod
    def from_tiled(cls, conv: TiledConv2d, preset: str | AnalogPreset = "rpu-baseline",
                   generator: torch.Generator | None = None,
                   construction_seeds: Sequence[int] | None = None) -> "AnalogTiledConv2d":
        """An analog copy of ``conv``: same shapes, groups, padding, scheme, assignment seed
        and weights."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, conv.tiles, conv.scheme, preset,
                    conv.weight.device, None, conv.generator if generator is None else generator,
                    construction_seeds, conv.groups, conv.padding_mode)
        if conv.fixed_seed is not None:
            layer.fixed_seed = conv.fixed_seed.detach().cpu().clone()
        layer.set_weights(conv.weight, conv.bias)
        layer.train(conv.training)
        return layer

    def to_digital(self) -> TiledConv2d:
        """A digital :class:`rapa.TiledConv2d` with the arrays' current weights."""
        conv = TiledConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                           self.padding, self.dilation, self.has_bias, self.tiles, self.scheme,
                           generator=self.generator, groups=self.groups, padding_mode=self.padding_mode)
        weight, bias = self.get_weights()
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None and conv.bias is not None:
                conv.bias.copy_(bias)
            if self.fixed_seed is not None and conv.fixed_seed is not None:
                conv.fixed_seed.copy_(self.fixed_seed)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return super().extra_repr() + f", preset={self.preset.name!r}"
