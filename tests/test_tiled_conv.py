"""TiledConv2d and the tiling schemes against independent references (SPEC §1)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rapa
from rapa import schemes
from rapa.ops import torch_path as torch_path_mod
from rapa.ops import workspace
from rapa.functional import tiled_conv2d
from rapa.tiled_conv import TiledConv2d

ALL = rapa.SCHEMES
EQUAL_TO_CONV = ("none", "random", "random_fixed", "alternate", "image_overlap")


def _layer(scheme: str, nt: int, cin=2, cout=3, k=3, **kw) -> TiledConv2d:
    return TiledConv2d(cin, cout, k, tiles=1 if scheme == "none" else nt, scheme=scheme, **kw)


def _spec_map(scheme: str, nt: int, h: int, w: int) -> torch.Tensor:
    """The SPEC's formula, written out pixel by pixel."""
    q = math.isqrt(nt)
    s = torch.empty(h, w, dtype=torch.long)
    for y in range(h):
        for x in range(w):
            if scheme == "alternate":
                s[y, x] = (x % q) + q * (y % q)
            else:
                s[y, x] = math.floor(q * x / w) + q * math.floor(q * y / h)
    return s


def _recover_map(layer: TiledConv2d, x: torch.Tensor) -> torch.Tensor:
    """Tile of every output pixel, read through the layer: zero weights and bias_j = j + 1."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_((torch.arange(layer.num_kernels, dtype=torch.float) + 1).view(-1, 1))
        return layer(x)[:, 0].round().long() - 1  # (N, oh, ow)


@pytest.mark.parametrize("scheme", EQUAL_TO_CONV + ("perforated",))
@pytest.mark.parametrize("geom", [
    dict(k=3, stride=1, padding=1, dilation=1, size=(8, 8)),
    dict(k=5, stride=1, padding=2, dilation=1, size=(7, 9)),
    dict(k=3, stride=2, padding=0, dilation=2, size=(11, 10)),
    dict(k=(3, 1), stride=(1, 2), padding=(1, 0), dilation=1, size=(6, 8)),
    dict(k=3, stride=2, padding=1, dilation=1, size=(9, 8)),
    dict(k=(3, 2), stride=(2, 3), padding=(2, 1), dilation=(2, 1), size=(10, 11)),
    dict(k=(2, 3), stride=(3, 1), padding=(0, 3), dilation=(1, 3), size=(9, 7)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_identical_tiles_equal_conv2d(scheme, geom, bias, backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, geom["k"], geom["stride"], geom["padding"], geom["dilation"], bias=bias)
    layer = TiledConv2d.from_conv2d(conv, 1 if scheme == "none" else 4, scheme)
    if scheme == "perforated":
        layer.eval()  # perforation is used in training only
    x = torch.randn(5, 3, *geom["size"], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, ref = layer(x), conv(x_ref)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    # the tiles share the convolution's weight gradient among them
    torch.testing.assert_close(layer.weight.grad.sum(0), conv.weight.grad, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(layer.bias.grad.sum(0), conv.bias.grad, rtol=1e-4, atol=1e-4)


def test_channels_last_input_keeps_memory_format(backend):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = TiledConv2d.from_conv2d(conv, 4, "random")
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    assert layer(torch.randn(2, 3, 8, 8)).is_contiguous()


@pytest.mark.parametrize("scheme", ["alternate", "image_overlap", "image_pad"])
@pytest.mark.parametrize("nt,size", [(4, (8, 8)), (16, (32, 32)), (9, (7, 11)), (4, (5, 3))])
def test_grid_maps_follow_spec_formula(scheme, nt, size):
    layer = _layer(scheme, nt, k=3, padding=1)
    x = torch.randn(2, 2, *size)
    s = _recover_map(layer, x)
    expected = _spec_map(scheme, nt, *size)
    assert torch.equal(s[0], expected) and torch.equal(s[1], expected)
    assert torch.equal(layer.tile_map(x)[0].view(*size), expected)


def test_random_partition_balanced_and_redrawn():
    torch.manual_seed(0)
    layer = _layer("random", 16, k=3, padding=1)
    x = torch.randn(6, 2, 9, 7)  # np = 63, not a multiple of 16
    for mode in ("train", "eval"):  # drawn anew in training and in evaluation
        getattr(layer, mode)()
        s1, s2 = _recover_map(layer, x), _recover_map(layer, x)
        for s in (s1, s2):
            counts = torch.stack([torch.bincount(si.flatten(), minlength=16) for si in s])
            assert counts.sum(1).eq(63).all()
            assert (counts.max(1).values - counts.min(1).values).le(1).all()
        assert not torch.equal(s1[0], s1[1]), "images share a partition"
        assert not torch.equal(s1, s2), "partition not redrawn between calls"


def test_random_partition_is_uniform():
    # which pixel goes to which tile, and which tiles get the extra pixel, is uniform
    g = torch.Generator().manual_seed(1)
    idx = schemes.random_partition_index(20000, 5, 2, generator=g)  # 5 pixels, 2 tiles
    s = schemes.index_to_tile_map(idx, 5)
    freq = s.eq(0).float().mean(0)
    torch.testing.assert_close(freq, torch.full((5,), 0.5), atol=0.02, rtol=0)
    sizes = s.eq(0).sum(1)
    assert set(sizes.tolist()) == {2, 3}
    assert abs(sizes.eq(3).float().mean().item() - 0.5) < 0.02


def test_random_follows_seed_and_generator():
    layer = _layer("random", 4)
    x = torch.randn(3, 2, 8, 8)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = layer(x)
    torch.manual_seed(6)
    c = layer(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    layer.generator = torch.Generator().manual_seed(3)
    d = layer(x)
    layer.generator = torch.Generator().manual_seed(3)
    torch.manual_seed(99)
    assert torch.equal(d, layer(x))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("own_generator", [False, True])
def test_layer_call_draws_and_computes_as_the_general_path(channels_last, own_generator):
    """A random layer's own call (rapa.functional.random_native_conv2d where the native kernels
    take it) gives the output, gradients and generator state of the scheme's draw
    (schemes.random_partition_index) put through tiled_conv2d; np = 64 splits evenly into 4
    tiles, 7x7 = 49 does not (one more draw per image: the general path); one tile draws nothing
    (an ordinary convolution)."""
    for size, nt in ((8, 4), (7, 4), (8, 1)):
        layer = TiledConv2d(3, 4, 3, padding=1, tiles=nt, scheme="random")
        if own_generator:
            layer.generator = torch.Generator().manual_seed(11)
        gen = layer.generator if own_generator else torch.default_generator
        x = torch.randn(5, 3, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(3)
        state = gen.get_state()
        out = layer(xa)
        after = gen.get_state()
        out.backward(torch.ones_like(out))
        grads = (xa.grad, layer.weight.grad, layer.bias.grad)
        layer.zero_grad()
        torch.manual_seed(3)
        gen.set_state(state)
        index = schemes.assignment_index("random", nt, 5, size, size, generator=layer.generator)  # (5, nt, M)
        assert torch.equal(gen.get_state(), after) and (index is None) == (nt == 1)
        ref = tiled_conv2d(xb, layer.weight, layer.bias, padding=1, scheme="random", index=index)
        ref.backward(torch.ones_like(ref))
        assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last) == channels_last
        for got, want in zip(grads, (xb.grad, layer.weight.grad, layer.bias.grad)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_random_fixed_is_fixed_and_survives_save_load():
    torch.manual_seed(0)
    layer = _layer("random_fixed", 4, k=3, padding=1)
    x = torch.randn(4, 2, 8, 8)
    s = _recover_map(layer, x)
    assert all(torch.equal(s[0], si) for si in s)
    assert torch.equal(s, _recover_map(layer, x))
    counts = torch.bincount(s[0].flatten(), minlength=4)
    assert counts.eq(16).all()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = _layer("random_fixed", 4, k=3, padding=1)
    assert not torch.equal(_recover_map(fresh, x), s)  # a new layer draws its own
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(_recover_map(fresh, x), s)


def test_image_pad_matches_per_region_zero_padded_images():
    torch.manual_seed(0)
    nt, h, w = 4, 8, 6
    layer = _layer("image_pad", nt, cin=2, cout=3, k=3, padding=1)
    x = torch.randn(2, 2, h, w, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    q, parts = 2, []
    for ry in range(q):
        row = []
        for rx in range(q):
            j = rx + q * ry
            y0, y1 = ry * h // q, (ry + 1) * h // q
            x0, x1 = rx * w // q, (rx + 1) * w // q
            region = x_ref[:, :, y0:y1, x0:x1]  # a separate zero-padded image
            row.append(F.conv2d(region, w_ref[j], b_ref[j], padding=1))
        parts.append(torch.cat(row, dim=3))
    ref = torch.cat(parts, dim=2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-4, atol=1e-5)


def _per_pixel_reference(x, weight, bias, s, k, padding):
    """Slow reference: every output pixel with its own tile's kernel (s: (N, oh, ow), -1 = 0)."""
    n, _, oh, ow = x.shape[0], None, s.shape[1], s.shape[2]
    xp = F.pad(x, (padding,) * 4)
    rows = []
    for i in range(n):
        for yy in range(oh):
            for xx in range(ow):
                j = int(s[i, yy, xx])
                if j < 0:
                    rows.append(torch.zeros(weight.shape[1]))
                    continue
                patch = xp[i, :, yy:yy + k, xx:xx + k]
                out = (weight[j] * patch).sum((1, 2, 3))
                rows.append(out + bias[j] if bias is not None else out)
    return torch.stack(rows).view(n, oh, ow, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("scheme,nt", [("random", 4), ("random", 3), ("alternate", 4),
                                       ("image_overlap", 9), ("perforated", 3)])
def test_gradients_against_per_pixel_reference(scheme, nt, backend):
    torch.manual_seed(0)
    layer = _layer(scheme, nt, cin=2, cout=3, k=3, padding=1)
    x = torch.randn(3, 2, 6, 5, requires_grad=True)
    index = layer.assignment(x)
    s = schemes.index_to_tile_map(index, 30).expand(3, 30).reshape(3, 6, 5)
    y = layer(x, index=index)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _per_pixel_reference(x_ref, w_ref, b_ref, s, 3, 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    # tile j's gradient comes only from its pixels: a tile with no pixels gets none
    for j in range(layer.num_kernels):
        if not (s == j).any():
            assert layer.weight.grad[j].abs().sum() == 0


def test_no_input_gradient_when_not_needed(backend):
    layer = _layer("random", 4)
    x = torch.randn(2, 2, 8, 8)
    y = layer(x)
    y.sum().backward()
    assert x.grad is None and layer.weight.grad is not None


def test_perforated_keeps_fraction_in_training_and_all_in_eval(backend):
    torch.manual_seed(0)
    layer = _layer("perforated", 4, cin=1, cout=1, k=1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    x = torch.rand(8, 1, 7, 7) + 1  # positive: every kept pixel is nonzero
    y = layer(x)
    kept = (y != 0).flatten(1).sum(1)
    assert kept.eq(math.ceil(49 / 4)).all()
    assert not torch.equal(y[0] != 0, y[1] != 0)
    layer.eval()
    ye = layer(x)
    assert (ye != 0).all()
    torch.testing.assert_close(ye, x + 1)


def test_from_conv2d_and_state_dict_shapes():
    conv = nn.Conv2d(3, 8, 5, padding=2)
    layer = TiledConv2d.from_conv2d(conv, 16, "random")
    assert layer.weight.shape == (16, 8, 3, 5, 5) and layer.bias.shape == (16, 8)
    assert torch.equal(layer.weight[7], conv.weight.detach())
    one = TiledConv2d(3, 8, 5, tiles=4, scheme="perforated")
    assert one.weight.shape == (1, 8, 3, 5, 5)
    assert "tiles=16" in repr(layer)


def test_device_and_dtype():
    layer = TiledConv2d(2, 3, 3, tiles=4, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer(torch.randn(1, 2, 6, 6, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("kwargs,match", [
    (dict(tiles=0), "tiles=0"),
    (dict(tiles=-2), "tiles=-2"),
    (dict(tiles=2, scheme="bogus"), "scheme='bogus'"),
    (dict(tiles=4, scheme="none"), "tiles=4"),
    (dict(tiles=8, scheme="alternate"), "tiles=8"),
    (dict(tiles=6, scheme="image_pad"), "tiles=6"),
    (dict(tiles=5, scheme="image_overlap"), "tiles=5"),
    (dict(tiles=4, tile_init="shared"), "tile_init='shared'"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiledConv2d(2, 3, 3, **kwargs)


@pytest.mark.parametrize("groups", [1, 2])
def test_replicated_tiles_start_as_conv2d(groups):
    torch.manual_seed(0)
    layer = TiledConv2d(4, 6, 3, padding=1, tiles=4, groups=groups, tile_init="replicate")
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(x, layer.weight[0], layer.bias[0], padding=1, groups=groups)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # another draw, the same
    independent = TiledConv2d(4, 6, 3, padding=1, tiles=4, groups=groups)
    assert not torch.equal(independent.weight[0], independent.weight[1])
    assert not torch.equal(independent.bias[0], independent.bias[1])


def test_bad_sizes_at_construction():
    with pytest.raises(ValueError, match="in_channels=0"):
        TiledConv2d(0, 3, 3)
    with pytest.raises(ValueError, match="stride"):
        TiledConv2d(2, 3, 3, stride=0)


def test_bad_input():
    layer = TiledConv2d(2, 3, 5, tiles=4)
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="tiles=4 is more than the 2 output pixels"):
        layer(torch.randn(1, 2, 5, 6))
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\) or \(C, H, W\)"):
        layer(torch.randn(8, 8))


class _PaperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, 1))
        self.fc = nn.Linear(64 * 16, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_convert_balanced_gives_paper_tiles_and_keeps_function():
    torch.manual_seed(0)
    net = _PaperNet()
    x = torch.randn(2, 3, 32, 32)
    ref = net(x)
    rapa.convert(net, tiles="balanced", scheme="random", input_size=(3, 32, 32))
    tiled = [m for m in net.modules() if isinstance(m, TiledConv2d)]
    assert [m.tiles for m in tiled] == [16, 4, 1]
    assert [m.weight.shape[0] for m in tiled] == [16, 4, 1]
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)
    assert rapa.balanced_tiles([1024, 256, 64]) == [16, 4, 1]
    assert rapa.balanced_tiles([1000, 200, 64], square=True) == [16, 4, 1]


def test_convert_per_layer_and_errors():
    net = _PaperNet()
    rapa.convert(net, tiles=(4, 4, 1), scheme="alternate")
    assert [m.tiles for m in net.modules() if isinstance(m, TiledConv2d)] == [4, 4, 1]
    with pytest.raises(ValueError, match="3 nn.Conv2d layers"):
        rapa.convert(_PaperNet(), tiles=(4, 4))
    with pytest.raises(ValueError, match="input_size"):
        rapa.convert(_PaperNet(), tiles="balanced")


def test_dense_reference_agrees(backend):
    torch.manual_seed(0)
    layer = _layer("random", 4, k=3, padding=1)
    x = torch.randn(3, 2, 8, 8)
    index = layer.assignment(x)
    s = schemes.index_to_tile_map(index, 64)
    dense = rapa.functional.tiled_conv2d_dense(x, layer.weight, layer.bias, s, padding=1)
    torch.testing.assert_close(layer(x, index=index), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,nt", [("random", 4), ("random", 5), ("image_pad", 4), ("perforated", 4)])
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_chunked_patch_gather_matches_per_pixel_reference(monkeypatch, scheme, nt, per_chunk, torch_path):
    # force chunks of one or two images (3 images: the last chunk is short): the CPU path
    # gathers patches and scatters gradients chunk by chunk
    torch.manual_seed(0)
    layer = _layer(scheme, nt, cin=2, cout=3, k=3, padding=1)
    x = torch.randn(3, 2, 6, 5, requires_grad=True)
    index = layer.assignment(x)
    per_image = index.shape[1] * index.shape[2] * 2 * 9 * x.element_size()  # bytes of patches
    monkeypatch.setattr(torch_path_mod, "CPU_CHUNK_BYTES", per_chunk * per_image + per_image // 2)
    assert torch_path_mod.chunk_size(3, per_image, x.device) == per_chunk
    s = schemes.index_to_tile_map(index, 30).expand(3, 30).reshape(3, 6, 5)
    y = layer(x, index=index)
    g = torch.randn_like(y)
    y.backward(g)
    if scheme == "image_pad":  # the region mask: compare with the unchunked layer instead
        monkeypatch.setattr(torch_path_mod, "CPU_CHUNK_BYTES", 2**30)
        x2 = x.detach().clone().requires_grad_(True)
        w_grad = layer.weight.grad.clone()
        layer.weight.grad = None
        y2 = layer(x2, index=index)
        y2.backward(g)
        torch.testing.assert_close(y, y2)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(w_grad, layer.weight.grad)
        return
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _per_pixel_reference(x_ref, w_ref, b_ref, s, 3, 1)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_scratch_reuse_across_layers_calls_and_threads(backend):
    # the CPU path keeps scratch buffers and index tables per thread between calls: two layers
    # of different shapes and dtypes, forwards interleaved before their backwards, and the
    # same work on two threads at once must all match nn.Conv2d (identical tiles)
    import threading

    def case(seed: int, dtype: torch.dtype):
        torch.manual_seed(seed)
        convs = [nn.Conv2d(3, 8, 3, padding=1).to(dtype), nn.Conv2d(8, 5, 5, stride=2, padding=2).to(dtype)]
        tiled = [TiledConv2d.from_conv2d(convs[0], 4, "random"), TiledConv2d.from_conv2d(convs[1], 9, "random")]
        xs = [torch.randn(6, 3, 12, 10, dtype=dtype, requires_grad=True),
              torch.randn(4, 8, 9, 11, dtype=dtype, requires_grad=True)]
        ys = [layer(x) for layer, x in zip(tiled, xs)]  # both forwards before any backward
        x_refs = [x.detach().clone().requires_grad_(True) for x in xs]
        refs = [conv(x) for conv, x in zip(convs, x_refs)]
        for y, ref in zip(reversed(ys), reversed(refs)):
            g = torch.randn_like(ref)
            y.backward(g)
            ref.backward(g)
        return ys, refs, xs, x_refs, tiled, convs

    def check(result):
        ys, refs, xs, x_refs, tiled, convs = result
        tol = dict(rtol=1e-4, atol=1e-4) if ys[0].dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        for y, ref, layer, conv in zip(ys, refs, tiled, convs):
            torch.testing.assert_close(y, ref, **tol)
            torch.testing.assert_close(layer.weight.grad.sum(0), conv.weight.grad, **tol)
        for x, x_ref in zip(xs, x_refs):
            torch.testing.assert_close(x.grad, x_ref.grad, **tol)

    check(case(0, torch.float32))
    check(case(1, torch.float64))
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            for _ in range(6):
                results[i] = case(10 + i, torch.float32)
                check(results[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results.values():
        check(r)


def test_input_gradient_matches_per_pixel_reference_with_distinct_tiles():
    # distinct tiles, stride and padding: the gathered input gradient against autograd
    # through a per-pixel reference
    torch.manual_seed(0)
    layer = TiledConv2d(3, 4, 3, stride=2, padding=1, tiles=5, scheme="random")
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    index = layer.assignment(x)
    oh, ow = layer.output_size(9, 8)
    s = schemes.index_to_tile_map(index, oh * ow).view(3, oh, ow)
    y = layer(x, index=index)
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True)
    ys = torch.stack([F.conv2d(x_ref, w_ref[j], b_ref[j], stride=2, padding=1) for j in range(5)])
    ref = ys.gather(0, s.unsqueeze(0).unsqueeze(2).expand(1, 3, 4, oh, ow))[0]  # (N, cout, oh, ow)
    torch.testing.assert_close(y, ref)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad)


@pytest.mark.parametrize("np_,nt", [(64, 4), (63, 16)])
def test_random_fixed_partition_is_a_function_of_the_seed(np_, nt):
    # a random_fixed layer saves only its seed, so the partition must stay what the seed gave
    # when the model was saved: the argsort of torch.rand keys drawn from that seed, dealt
    # round-robin to the tiles (and, when np % nt != 0, the full columns to tiles tau)
    seed = 1234
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(1, np_, generator=g).argsort(dim=1)[0].tolist()
    m = -(-np_ // nt)
    expected = [[perm[r * nt + col] if r * nt + col < np_ else np_ for r in range(m)] for col in range(nt)]
    if m * nt != np_:
        tau = torch.rand(1, nt, generator=g).argsort(dim=1)[0].tolist()
        expected = [expected[t] for t in tau]
    side = math.isqrt(np_) if math.isqrt(np_) ** 2 == np_ else None
    oh, ow = (side, side) if side else (7, 9)
    got = schemes.assignment_index("random_fixed", nt, 5, oh, ow, fixed_seed=seed)
    assert got.tolist() == [expected]


def test_clear_workspace_frees_scratch_and_results_stay_correct(torch_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = TiledConv2d.from_conv2d(conv, 4, "random")
    x = torch.randn(2, 3, 8, 8)
    layer(x)
    assert workspace.scratch.bufs
    rapa.functional.clear_workspace()
    assert not workspace.scratch.bufs and not workspace.scratch.tables
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,nt", [("random", 5), ("image_pad", 4), ("perforated", 4)])
def test_other_devices_path_one_chunk_fresh_buffers(monkeypatch, scheme, nt, torch_path):
    # off the CPU the layer runs the whole batch as one chunk with fresh buffers and no
    # cached tables; run that path here (no GPU in CI) and compare with the CPU path
    torch.manual_seed(0)
    layer = _layer(scheme, nt, cin=2, cout=3, k=3, padding=1)
    x = torch.randn(5, 2, 7, 6, requires_grad=True)
    index = layer.assignment(x)
    y = layer(x, index=index)
    g = torch.randn_like(y)
    y.backward(g)
    grads = x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()
    ws = workspace.scratch
    monkeypatch.setattr(torch_path_mod, "chunk_size", lambda n, per_image, device: n)
    monkeypatch.setattr(ws, "get", lambda role, numel, like: like.new_empty(numel))
    monkeypatch.setattr(ws, "arange", lambda n, device: torch.arange(n, device=device))
    monkeypatch.setattr(ws, "memo", lambda key, make: make())
    x2 = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y2 = layer(x2, index=index)
    y2.backward(g)
    torch.testing.assert_close(y2, y)
    for a, b in zip((x2.grad, layer.weight.grad, layer.bias.grad), grads):
        torch.testing.assert_close(a, b)
