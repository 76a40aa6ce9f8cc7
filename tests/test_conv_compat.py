"""``TiledConv2d`` accepts what ``nn.Conv2d`` accepts: groups (grouped, depthwise), every
padding mode, the padding strings and unbatched inputs; checked against ``nn.Conv2d`` /
``F.conv2d`` and, in float64, against numerical derivatives (``gradcheck``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rapa
from rapa import TiledConv2d

# configurations in the style of PyTorch's own Conv2d module tests: nn.Conv2d keyword arguments
# (in_channels, out_channels, kernel_size first) and the input size
CONFIGS = [
    ("rect_kernel", dict(in_channels=3, out_channels=4, kernel_size=(3, 2)), (9, 8)),
    ("stride_padding", dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (9, 10)),
    ("dilation", dict(in_channels=3, out_channels=4, kernel_size=3, dilation=2, padding=2), (9, 9)),
    ("no_bias", dict(in_channels=3, out_channels=4, kernel_size=3, bias=False), (8, 8)),
    ("groups2", dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), (8, 7)),
    ("depthwise", dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1), (8, 8)),
    ("depthwise_wide", dict(in_channels=37, out_channels=37, kernel_size=3, groups=37, padding=1,
                            stride=2), (9, 8)),  # channels: whole vectors and a tail
    ("depthwise_multiplier", dict(in_channels=3, out_channels=6, kernel_size=3, groups=3), (8, 8)),
    ("depthwise_5x5_no_bias", dict(in_channels=8, out_channels=8, kernel_size=5, groups=8, padding=2,
                                   bias=False), (9, 9)),
    ("circular", dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"), (7, 8)),
    ("reflect", dict(in_channels=3, out_channels=4, kernel_size=3, padding=(1, 2), padding_mode="reflect"), (7, 8)),
    ("replicate", dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="replicate",
                       stride=2), (7, 8)),
    ("same", dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"), (7, 8)),
    ("same_even_kernel", dict(in_channels=3, out_channels=4, kernel_size=(4, 2), padding="same"), (7, 8)),
    ("same_dilated_circular", dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2,
                                   padding_mode="circular"), (8, 8)),
    ("valid", dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"), (7, 8)),
    ("depthwise_same_reflect", dict(in_channels=5, out_channels=5, kernel_size=3, groups=5, padding="same",
                                    padding_mode="reflect"), (7, 8)),
]
IDS = [c[0] for c in CONFIGS]


def _ref_conv(x, weight, bias, conv: nn.Conv2d):
    """``conv``'s own computation with another weight and bias."""
    return conv._conv_forward(x, weight, bias)


def _per_tile_reference(x, weight, bias, tile_map, conv: nn.Conv2d):
    """Every tile's ``nn.Conv2d`` output, then each pixel's tile (-1: output 0)."""
    ys = torch.stack([_ref_conv(x, weight[j], None if bias is None else bias[j], conv)
                      for j in range(weight.shape[0])])  # (nt, N, cout, oh, ow)
    n, cout, oh, ow = ys.shape[1:]
    sel = tile_map.clamp(min=0).view(-1, oh, ow).expand(n, oh, ow)
    out = ys.gather(0, sel.view(1, n, 1, oh, ow).expand(1, n, cout, oh, ow))[0]
    return out * (tile_map >= 0).view(-1, 1, oh, ow).to(out.dtype)


@pytest.mark.parametrize("name,kwargs,size", CONFIGS, ids=IDS)
@pytest.mark.parametrize("scheme,nt", [("random", 4), ("alternate", 4), ("random_fixed", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_replicas_reproduce_conv2d(name, kwargs, size, scheme, nt, dtype, backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs, dtype=dtype)
    layer = TiledConv2d.from_conv2d(conv, nt, scheme)
    assert (layer.groups, layer.padding_mode, layer.padding) == (conv.groups, conv.padding_mode, conv.padding)
    x = torch.randn(3, kwargs["in_channels"], *size, dtype=dtype, requires_grad=True)
    y_ref, y = conv(x), layer(x)
    g = torch.randn_like(y_ref)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_ref, **tol)
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    tparams = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    ref_grads = torch.autograd.grad(y_ref, [x, *params], g)
    grads = torch.autograd.grad(y, [x, *tparams], g)
    torch.testing.assert_close(grads[0], ref_grads[0], **tol)
    for got, want in zip(grads[1:], ref_grads[1:]):  # the replicas' gradients sum to conv's
        torch.testing.assert_close(got.sum(0), want, **tol)


@pytest.mark.parametrize("name,kwargs,size", CONFIGS, ids=IDS)
@pytest.mark.parametrize("scheme,nt", [("random", 5), ("perforated", 3)])
def test_distinct_tiles_match_per_tile_conv2d(name, kwargs, size, scheme, nt, backend):
    torch.manual_seed(1)
    conv = nn.Conv2d(**kwargs)
    layer = TiledConv2d.from_conv2d(conv, nt, scheme)
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    x = torch.randn(2, kwargs["in_channels"], *size, requires_grad=True)
    index = layer.assignment(x)
    oh, ow = layer.output_size(*size)
    tile_map = rapa.schemes.index_to_tile_map(index, oh * ow)
    y = layer(x, index=index)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    ref = _per_tile_reference(x, w, b, tile_map, conv)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    tparams = [layer.weight] + ([layer.bias] if b is not None else [])
    got = torch.autograd.grad(y, [x, *tparams], g)
    want = torch.autograd.grad(ref, [x, w, *([b] if b is not None else [])], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme,nt", [("random", 5), ("perforated", 3), ("image_pad", 4)])
def test_unfold_grouped_path_matches_per_tile_conv2d(scheme, nt, monkeypatch, torch_path):
    """Grouped layers with more groups than GROUP_LOOP_MAX (here: any) on the unfold path."""
    monkeypatch.setattr(rapa.functional, "GROUP_LOOP_MAX", 0)
    torch.manual_seed(7)
    conv = nn.Conv2d(6, 9, 3, padding=1, groups=3)
    layer = TiledConv2d.from_conv2d(conv, nt, scheme)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    index = layer.assignment(x)
    y = layer(x, index=index)
    if scheme == "image_pad":  # the same layer, one call per group, is checked against regions
        monkeypatch.setattr(rapa.functional, "GROUP_LOOP_MAX", 16)
        torch.testing.assert_close(y, layer(x, index=index), rtol=1e-5, atol=1e-5)
        return
    ref = _per_tile_reference(x, layer.weight, layer.bias, rapa.schemes.index_to_tile_map(index, 64), conv)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, layer.weight, layer.bias], g),
                    torch.autograd.grad(ref, [x, layer.weight, layer.bias], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_image_pad_grouped(backend):
    """``image_pad`` with groups: the pixels of each region equal a grouped ``F.conv2d`` of that
    region cut out of the image and zero-padded on its own (SPEC §1), every tile distinct."""
    torch.manual_seed(2)
    layer = TiledConv2d(4, 4, 3, padding=1, groups=4, tiles=4, scheme="image_pad")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 4, 8, 8)
    y = layer(x)
    for ty in range(2):
        for tx in range(2):
            t = tx + 2 * ty
            region = x[:, :, 4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4]
            ref = F.conv2d(region, layer.weight[t], layer.bias[t], padding=1, groups=4)
            torch.testing.assert_close(y[:, :, 4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4], ref,
                                       rtol=1e-5, atol=1e-5)


GRADCHECK = [c for c in CONFIGS if c[0] in ("groups2", "depthwise", "depthwise_multiplier", "circular",
                                             "reflect", "replicate", "same_even_kernel", "valid")]


GRADCHECK_CASES = [(*c, True) for c in GRADCHECK] + [(*c, False) for c in GRADCHECK if "groups" in c[1]]


@pytest.mark.parametrize("name,kwargs,size,group_loop", GRADCHECK_CASES,
                         ids=[f"{c[0]}-{'loop' if c[3] else 'unfold'}" for c in GRADCHECK_CASES])
@pytest.mark.parametrize("scheme", ["random", "perforated"])
def test_gradcheck_float64(name, kwargs, size, group_loop, scheme, monkeypatch):
    """Analytic gradients of input, distinct weights and biases against finite differences,
    grouped layers both as one call per group and on the unfold path."""
    if not group_loop:
        monkeypatch.setattr(rapa.functional, "GROUP_LOOP_MAX", 0)
    torch.manual_seed(3)
    small = {"groups2": (4, 4, 2), "depthwise": (4, 4, 4), "depthwise_multiplier": (2, 4, 2)}
    cin, cout, groups = small.get(name, (3, 4, 1))
    kw = dict(kwargs, in_channels=cin, out_channels=cout, groups=groups)
    layer = TiledConv2d(**{k: v for k, v in kw.items() if k != "bias"}, bias=kwargs.get("bias", True),
                        tiles=3, scheme=scheme, dtype=torch.float64)
    x = torch.randn(2, kw["in_channels"], 5, 6, dtype=torch.float64, requires_grad=True)
    index = layer.assignment(x)
    w = torch.randn_like(layer.weight, requires_grad=True)
    b = torch.randn_like(layer.bias, requires_grad=True)

    def f(x, w, b):
        return rapa.functional.tiled_conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, scheme, 3,
                                            index=index, groups=layer.groups, padding_mode=layer.padding_mode)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("name,kwargs,size", [c for c in CONFIGS if c[0] in ("depthwise", "groups2", "reflect",
                                                                            "same")], ids=str)
def test_unbatched_input(name, kwargs, size, backend):
    torch.manual_seed(4)
    conv = nn.Conv2d(**kwargs)
    layer = TiledConv2d.from_conv2d(conv, 4, "random")
    x = torch.randn(kwargs["in_channels"], *size, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(conv(x), x, g)[0],
                               rtol=1e-5, atol=1e-5)
    assert layer.tile_map(x).shape == (1, y.shape[-2] * y.shape[-1])


def test_depthwise_runs_on_native_kernels_and_threads_agree(monkeypatch):
    from rapa import native

    monkeypatch.setenv(native.ENV_SWITCH, "1")
    if not native.available():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(5)
    layer = TiledConv2d(40, 40, 3, padding=1, groups=40, tiles=4)
    x = torch.randn(5, 40, 9, 9, requires_grad=True)
    index = layer.assignment(x)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            y = layer(x, index=index)
            assert type(y.grad_fn).__name__ == "NativeDepthwiseFnBackward"
            results.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.weight, layer.bias])))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    grouped = TiledConv2d(4, 4, 3, groups=2, tiles=2)  # not depthwise: the PyTorch path
    assert type(grouped(torch.randn(1, 4, 6, 6, requires_grad=True)).grad_fn).__name__ != "NativeDepthwiseFnBackward"


@pytest.mark.parametrize("x_last,g_last", [(True, True), (True, False), (False, True)])
def test_depthwise_channels_last_layouts(x_last, g_last, backend):
    """Channels-last and NCHW inputs and output gradients give the same results; the output
    keeps the input's layout."""
    torch.manual_seed(6)
    conv = nn.Conv2d(20, 20, 3, padding=1, groups=20)
    layer = TiledConv2d.from_conv2d(conv, 4, "random")
    x = torch.randn(3, 20, 7, 9)
    if x_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = layer(x)
    if backend == "native":
        assert y.is_contiguous(memory_format=torch.channels_last) == x_last
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    g = torch.randn(3, 20, 7, 9)
    if g_last:
        g = g.contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
    want = torch.autograd.grad(conv(x), [x, conv.weight, conv.bias], g)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].sum(0), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2].sum(0), want[2], rtol=1e-5, atol=1e-5)


def test_from_conv2d_rejects_other_layers():
    with pytest.raises(ValueError, match="Linear is not an nn.Conv2d"):
        TiledConv2d.from_conv2d(nn.Linear(3, 4), 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=2), "groups=2 must divide in_channels=3"),
    (dict(groups=0), "groups=0"),
    (dict(padding_mode="mirror"), "padding_mode='mirror'"),
    (dict(padding="full"), "padding='full'"),
    (dict(padding="same", stride=2), "padding='same' with stride"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiledConv2d(3, 4, 3, tiles=2, **kwargs)


def test_repr_names_groups_and_padding_mode():
    layer = TiledConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="circular"), 4)
    assert "groups=4" in repr(layer) and "padding_mode='circular'" in repr(layer) and "padding=same" in repr(layer)
    assert layer.weight.shape == (4, 4, 1, 3, 3)
