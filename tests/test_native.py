"""The native CPU kernels of the tiled convolution against per-tile ``F.conv2d`` references."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import rapa
from rapa import native, schemes
from rapa.ops import native as ops_native
from rapa.ops import native_op


@pytest.fixture
def lib(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    if not native.available():
        pytest.skip(f"native kernels unavailable: {ops_native._state.get('error')}")
    return native.library()


def _reference(x, weight, bias, tile_map, stride, padding, dilation):
    """Every tile's ordinary convolution, then each pixel's tile (-1: output 0)."""
    nt = weight.shape[0]
    ys = torch.stack([F.conv2d(x, weight[j], None if bias is None else bias[j], stride, padding, dilation)
                      for j in range(nt)])  # (nt, N, cout, oh, ow)
    n, cout, oh, ow = ys.shape[1:]
    sel = tile_map.clamp(min=0).view(-1, oh, ow).expand(n, oh, ow)
    out = ys.gather(0, sel.view(1, n, 1, oh, ow).expand(1, n, cout, oh, ow))[0]
    return out * (tile_map >= 0).view(-1, 1, oh, ow).to(out.dtype)


GEOMS = [  # cin, cout, kernel, stride, padding, dilation, size, tiles
    (3, 32, 5, 1, 2, 1, (12, 12), 16),   # the paper's conv1 (K = 75: tails of the blocks)
    (32, 32, 5, 1, 2, 1, (8, 8), 4),     # conv2
    (3, 8, 3, 1, 1, 1, (5, 35), 4),      # RGB rows of 16, 16 and 3 pixels (NCHW: interleaved in registers)
    (1, 5, 3, 1, 1, 1, (9, 7), 4),       # one input channel, channels not a vector multiple
    (4, 70, 3, 2, 1, 1, (11, 10), 3),    # more than one block of output channels
    (5, 17, (3, 2), (2, 3), (2, 1), (2, 1), (10, 11), 5),
    (6, 8, (2, 3), (3, 1), (0, 3), (1, 3), (9, 7), 2),  # dilation across: one segment per offset
    (1, 16, 1, 1, 0, 1, (5, 6), 3),      # 1x1 kernel, one channel
    (4, 16, 3, 1, 3, 1, (5, 6), 3),      # padding past the kernel's reach: border pixels whose
                                         # whole window is padding (their output is the bias)
    (1, 32, 5, 1, 2, 1, (10, 9), 4),     # grey images (conv1 on Fashion-MNIST): the weight
                                         # rearranged is a strided view, channels fill vectors
]


def _path(y):
    """Which implementation made ``y``: the C++ operators, the ctypes path, or another."""
    name = type(y.grad_fn).__name__
    if name == "NativeTiledConv2dFnBackward":
        return "ctypes"
    return "op" if "TiledConv" in y.grad_fn.name() and name != "TiledConv2dFnBackward" else name


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("scheme", ["random", "random_fixed", "alternate", "perforated"])
@pytest.mark.parametrize("bias,channels_last", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("via", ["op", "ctypes"])
def test_native_matches_per_tile_conv2d(lib, monkeypatch, geom, scheme, bias, channels_last, via):
    # through the C++ operator (rapa::tiled_conv: a given index) and through ctypes
    monkeypatch.setenv(native_op.ENV_SWITCH, "1" if via == "op" else "0")
    if via == "op":
        _op_or_skip()
    cin, cout, k, stride, padding, dilation, size, nt = geom
    if scheme == "alternate":
        nt = 4  # a grid scheme: a square number of tiles
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(cin, cout, k, stride, padding, dilation, bias=bias, tiles=nt, scheme=scheme)
    x = torch.randn(3, cin, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = _check_against_reference(layer, x, layer.assignment(x))
    assert _path(y) == via


def _check_against_reference(layer, x, index, threads=None):
    """Forward and backward of ``layer`` (on ``threads`` threads; None: as set) against the
    per-tile reference; returns the output."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        y = layer(x, index=index)
        g = torch.randn_like(y)
        y.backward(g)
    finally:
        torch.set_num_threads(before)
    tile_map = schemes.index_to_tile_map(index, y.shape[-2] * y.shape[-1])
    xr = x.detach().clone().requires_grad_(x.requires_grad)
    wr = layer.weight.detach().clone().requires_grad_(True)
    br = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    ref = _reference(xr, wr, br, tile_map, layer.stride, layer.padding, layer.dilation)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, wr.grad, rtol=1e-4, atol=1e-3)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, br.grad, rtol=1e-4, atol=1e-4)
    return y


def _op_or_skip():
    """Skip where the operator cannot be built here; fail where it was built but its check
    against the ctypes path refused it (a bug)."""
    if native_op.op() is None:
        assert "does not reproduce" not in (native_op.error() or ""), native_op.error()
        pytest.skip(f"the operator is unavailable: {native_op.error()}")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias,own_generator", [(True, False), (False, True)])
def test_operator_draws_and_computes_as_the_per_tile_reference(lib, monkeypatch, channels_last, bias, own_generator):
    # rapa::random_tiled_conv (the layer's call with its autograd in C++) draws the assignment
    # that the scheme draws from the same generator state and computes every pixel with its
    # tile: output and all gradients against per-tile F.conv2d with that assignment
    monkeypatch.setenv(native_op.ENV_SWITCH, "1")
    _op_or_skip()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11) if own_generator else None
    layer = rapa.TiledConv2d(3, 32, 5, padding=2, tiles=16, bias=bias, generator=gen)  # the paper's conv1
    x = torch.randn(3, 3, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    state = (gen or torch.default_generator).get_state()
    y = layer(x)
    assert _path(y) == "op"
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    after = (gen or torch.default_generator).get_state()
    (gen or torch.default_generator).set_state(state)
    index = layer.assignment(x)  # the scheme's draw from the same state
    assert torch.equal((gen or torch.default_generator).get_state(), after)  # left where the scheme leaves it
    g = torch.randn_like(y)
    y.backward(g)
    tile_map = schemes.index_to_tile_map(index, 144)
    xr = x.detach().clone().requires_grad_(True)
    wr = layer.weight.detach().clone().requires_grad_(True)
    br = layer.bias.detach().clone().requires_grad_(True) if bias else None
    ref = _reference(xr, wr, br, tile_map, layer.stride, layer.padding, layer.dilation)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, wr.grad, rtol=1e-4, atol=1e-3)
    if bias:
        torch.testing.assert_close(layer.bias.grad, br.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("needs", ["x", "weight", "bias", "none"])
def test_operator_is_the_ctypes_path_bit_for_bit(lib, monkeypatch, needs):
    # the same call through the operator and through the ctypes path (RAPA_NATIVE_OP=0, read at
    # every call): the same output, gradients (those asked for only) and generator state
    _op_or_skip()
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(32, 32, 5, padding=2, tiles=4)  # the paper's conv2
    x = torch.randn(2, 32, 8, 8)
    layer.weight.requires_grad_(needs == "weight")
    layer.bias.requires_grad_(needs == "bias")
    x.requires_grad_(needs == "x")
    g = torch.randn(2, 32, 8, 8)
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv(native_op.ENV_SWITCH, switch)
        for t in (x, layer.weight, layer.bias):
            t.grad = None
        torch.manual_seed(5)
        y = layer(x)
        if needs != "none":
            assert _path(y) == ("op" if switch == "1" else "ctypes")
        if needs != "none":
            y.backward(g)
        runs.append([y.detach(), torch.default_generator.get_state(),
                     *[t.grad for t in (x, layer.weight, layer.bias)]])
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)
    assert sum(t is not None for t in runs[0][2:]) == (needs != "none")
    with torch.no_grad():
        assert not layer(x).requires_grad
    with torch.inference_mode():
        assert layer(x).shape == (2, 32, 8, 8)


def test_operator_first_used_without_gradients_or_in_float64_defaults_is_still_taken(lib, monkeypatch):
    # the operator checks itself against the ctypes path on its first use: a first use in
    # evaluation (no_grad, inference mode) or under float64 defaults must not fail that check
    _op_or_skip()
    before = torch.get_default_dtype()
    for mode in (torch.no_grad, torch.inference_mode):
        monkeypatch.setattr(native_op, "_state", {})
        torch.set_default_dtype(torch.float64)
        try:
            with mode():
                y = rapa.TiledConv2d(3, 8, 3, padding=1, tiles=4).float()(torch.randn(2, 3, 8, 8).float())
        finally:
            torch.set_default_dtype(before)
        assert y.shape == (2, 8, 8, 8)
        assert native_op.op() is not None, native_op.error()


@pytest.mark.parametrize("switch", ["1", "0"])
def test_train_profile_counts_the_tiled_layers_as_convolutions(lib, monkeypatch, switch):
    # `rapa bench train --profile` sorts the profiler's ops into parts by name: a tiled layer's
    # forward and backward, through the operator or through ctypes, count as convolutions
    from torch.profiler import ProfilerActivity, profile

    from rapa.bench.train import PARTS

    monkeypatch.setenv(native_op.ENV_SWITCH, switch)
    layer = rapa.TiledConv2d(3, 8, 3, padding=1, tiles=4)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    keys = {e.key for e in prof.key_averages() if not e.key.startswith("autograd::engine::")}
    tiled = {k for k in keys if "TiledConv" in k or k.startswith("rapa::")}
    assert len(tiled) == 2 and tiled <= set(PARTS["convolution"]), tiled


@pytest.mark.parametrize("scheme", ["random", "alternate"])  # the lean call; a given index
def test_torch_compile_runs_the_native_calls_eagerly(lib, scheme):
    # the operators have no fake-tensor kernels: under torch.compile the layer's native call is
    # a graph break (as the ctypes path was) and gives the eager output and gradients
    layer = rapa.TiledConv2d(3, 8, 3, padding=1, tiles=4, scheme=scheme, generator=torch.Generator())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss(t):
        return (layer(t).relu() ** 2).sum()

    results = []
    for fn in (torch.compile(loss, backend="aot_eager"), loss):
        layer.generator.manual_seed(5)
        layer.weight.grad = None
        out = fn(x)
        out.backward()
        results.append((out.detach(), layer.weight.grad.clone()))
    torch.testing.assert_close(results[0], results[1])


def test_operator_that_cannot_be_built_leaves_the_ctypes_path(lib, monkeypatch):
    # a failed build of the operator (no compiler for torch's headers, say) is recorded and the
    # layer runs on the ctypes path with the same results
    def fail(force=False):
        raise RuntimeError("no C++20 compiler here")

    monkeypatch.setenv(native_op.ENV_SWITCH, "1")
    monkeypatch.setattr(native_op, "_state", {})
    monkeypatch.setattr(native_op, "build", fail)
    layer = rapa.TiledConv2d(3, 8, 3, padding=1, tiles=4)
    y = layer(torch.randn(2, 3, 6, 6, requires_grad=True))
    assert _path(y) == "ctypes"
    assert native_op.op() is None and native_op.tiled() is None and "no C++20 compiler" in native_op.error()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scheme", ["random", "perforated"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_images_match_per_tile_conv2d(lib, threads, scheme, channels_last):
    # Where padding is skipped the kernels stack several images' pixels of a tile into one group
    # (here up to 8 images): 9 images give stacks of 5 and 4 on one thread, and stacks of 4 and
    # 1 around an image whose tiles two threads share on two
    torch.manual_seed(1)
    layer = rapa.TiledConv2d(8, 16, 5, padding=2, tiles=4, scheme=scheme)
    x = torch.randn(9, 8, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    _check_against_reference(layer, x, layer.assignment(x), threads)


def test_weight_gradient_of_a_large_nchw_gradient_splits_the_images(lib):
    # an NCHW output gradient much larger than the per-thread partial sums: rather than every
    # thread transposing every image's gradient (to sum its share of the tiles), the threads
    # split the images and add their partials; the gradients still match the reference
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(3, 32, 5, padding=2, tiles=16)
    x = torch.randn(24, 3, 16, 16)  # gradient 24*256*32 floats > 2 * 2 threads * 16 tiles * 76 * 32
    _check_against_reference(layer, x, layer.assignment(x), 2)


def test_only_the_needed_gradients(lib):
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(3, 6, 3, padding=1, tiles=4)
    x = torch.randn(2, 3, 8, 8)
    index = layer.assignment(x)
    tile_map = schemes.index_to_tile_map(index, 64)
    layer.weight.requires_grad_(False)  # the bias alone
    layer(x, index=index).sum().backward()
    ref = torch.stack([(tile_map == j).sum() for j in range(4)]).float().view(4, 1).expand(4, 6)
    torch.testing.assert_close(layer.bias.grad, ref)
    assert layer.weight.grad is None and x.grad is None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad_channels_last", [False, True])
def test_output_and_input_gradient_keep_the_input_memory_format(lib, channels_last, grad_channels_last):
    # NCHW and channels-last inputs are read as they are; the output and the input gradient come
    # back in the input's memory format, whatever the format of the output gradient
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 16, 3, padding=1)
    layer = rapa.TiledConv2d.from_conv2d(conv, 4, "random")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, 9, 8).contiguous(memory_format=fmt).requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn(y.shape).contiguous(memory_format=torch.channels_last if grad_channels_last
                                        else torch.contiguous_format)
    y.backward(g)
    assert x.grad.is_contiguous(memory_format=fmt)
    xr = x.detach().contiguous().requires_grad_(True)
    ref = conv(xr)  # identical tiles: the layer is this convolution
    ref.backward(g.contiguous())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad.sum(0), conv.weight.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("scheme,channels_last", [("random", False), ("random", True), ("perforated", False)])
def test_thread_counts_agree_and_runs_are_deterministic(lib, threads, scheme, channels_last):
    # 3 threads share 7 images x 4 tiles unevenly: an image's tiles are split between threads
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(8, 16, 3, padding=1, tiles=4, scheme=scheme)
    x = torch.randn(7, 8, 10, 10)  # 7 images: uneven shares
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    index = layer.assignment(x)
    before = torch.get_num_threads()

    def run(nth):
        torch.set_num_threads(nth)
        try:
            x.grad = layer.weight.grad = layer.bias.grad = None
            y = layer(x, index=index)
            y.backward(torch.ones_like(y))
            return y.detach(), x.grad, layer.weight.grad, layer.bias.grad
        finally:
            torch.set_num_threads(before)

    one, many, again = run(1), run(threads), run(threads)
    for a, b, c in zip(one, many, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)  # the same thread count: bitwise the same


@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_gradient_is_bitwise_the_same_for_thread_counts_that_share_the_tiles(lib, channels_last):
    # 1, 2 and 4 threads share 4 tiles evenly: each tile's gradient is summed over the images in
    # image order, whatever the thread count (3 threads sum partials: equal up to rounding)
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(8, 16, 3, padding=1, tiles=4)
    x = torch.randn(5, 8, 10, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    index = layer.assignment(x)
    before = torch.get_num_threads()
    grads = {}
    try:
        for nth in (1, 2, 3, 4):
            torch.set_num_threads(nth)
            layer.weight.grad = layer.bias.grad = None
            y = layer(x, index=index)
            y.backward(torch.ones_like(y))
            grads[nth] = (layer.weight.grad.clone(), layer.bias.grad.clone())
    finally:
        torch.set_num_threads(before)
    for nth in (2, 4):
        assert torch.equal(grads[nth][0], grads[1][0]) and torch.equal(grads[nth][1], grads[1][1])
    torch.testing.assert_close(grads[3][0], grads[1][0], rtol=1e-5, atol=1e-5)


def test_falls_back_to_pytorch_path():
    torch.manual_seed(0)
    layer = rapa.TiledConv2d(2, 3, 3, padding=1, tiles=4, scheme="image_pad")
    x = torch.randn(2, 2, 8, 8)
    assert type(layer(x).grad_fn).__name__ == "TiledConv2dFnBackward"  # the mask: PyTorch path
    layer = rapa.TiledConv2d(2, 3, 3, padding=1, tiles=4).double()
    assert type(layer(x.double()).grad_fn).__name__ == "TiledConv2dFnBackward"
    old = os.environ.get(native.ENV_SWITCH)
    os.environ[native.ENV_SWITCH] = "0"
    try:
        assert type(layer.float()(x).grad_fn).__name__ == "TiledConv2dFnBackward"
    finally:
        if old is None:
            del os.environ[native.ENV_SWITCH]
        else:
            os.environ[native.ENV_SWITCH] = old


def test_failed_build_warns_and_uses_pytorch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(ops_native, "_state", {})
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    layer = rapa.TiledConv2d.from_conv2d(conv, 4, "random")
    x = torch.randn(2, 2, 8, 8)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
        y = layer(x)
    assert "failed" in ops_native._state["error"]
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        layer(x)
    assert not native.enabled() and not list(tmp_path.glob("*.so"))


def test_build_is_cached_per_source_and_cpu(lib, tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.exists()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])  # AVX2 (8 floats), SSE (4 floats)
def test_narrower_vector_builds_match_reference(lib, arch, tmp_path):
    # the kernels' blocking depends on the vector width: build them for older x86 CPUs and run
    # the reference tests on those builds (this CPU runs their instructions too)
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 targets")
    env = dict(os.environ, RAPA_NATIVE_ARCH=arch, RAPA_NATIVE_DIR=str(tmp_path), RAPA_NATIVE="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "matches_per_tile or only_the_needed"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "passed" in res.stdout and "skipped" not in res.stdout
    built = [p.name for p in tmp_path.glob("*.so")]
    assert len([n for n in built if "_op_" not in n]) == 1, built  # the kernels, built for that target
    assert len(built) == 2, built  # and the C++ operators over them (tested there too)


def test_clear_workspace_frees_native_scratch_and_results_stay_correct(lib):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    layer = rapa.TiledConv2d.from_conv2d(conv, 4, "random")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    rapa.functional.clear_workspace()
    for _ in range(2):  # scratch regrown after the clear
        x.grad = layer.weight.grad = None
        y = layer(x)
        y.sum().backward()
        xr = x.detach().clone().requires_grad_(True)
        conv.zero_grad()
        ref = conv(xr)
        ref.sum().backward()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad.sum(0), conv.weight.grad, rtol=1e-4, atol=1e-4)


def test_index_of_wrong_shape_is_refused(lib):
    layer = rapa.TiledConv2d(2, 3, 3, padding=1, tiles=4)
    x = torch.randn(3, 2, 6, 6)
    index = layer.assignment(x)
    for bad in (index[:2], index[:, :3], index[0]):
        with pytest.raises(ValueError, match="index of shape"):
            layer(x, index=bad)
    # int32 indices work like int64 ones
    torch.testing.assert_close(layer(x, index=index.int()), layer(x, index=index))


def test_geometry_struct_matches_the_cpp_struct(lib, monkeypatch):
    # the kernels read the call's geometry as one C struct: its size and the offset of every
    # named field, as the C++ compiler lays them out, must be those of the ctypes mirror
    import ctypes

    from rapa.ops.geometry import NATIVE_FIELDS, NativeGeometry

    size, offsets = ops_native.geometry_layout(lib)
    assert size == ctypes.sizeof(NativeGeometry) == 8 * len(NATIVE_FIELDS)
    assert offsets == [getattr(NativeGeometry, name).offset for name in NATIVE_FIELDS]
    # a mirror whose fields are named in another order is refused when the library loads
    monkeypatch.setattr(ops_native, "NATIVE_FIELDS", tuple(reversed(NATIVE_FIELDS)))
    with pytest.raises(RuntimeError, match="does not match"):
        ops_native._check_layout(lib)


def test_geometry_of_a_call():
    from rapa.ops.geometry import ConvGeometry

    x = torch.zeros(2, 3, 9, 7)
    weight = torch.zeros(4, 5, 3, 3, 2)
    index = torch.zeros(1, 4, 6, dtype=torch.long)
    geo = ConvGeometry.of(x, weight, index, (2, 1), (1, 0), (1, 2), (5, 5))
    assert geo.padded_size == (11, 7) and geo.num_pixels == 25 and geo.patch_size == 18
    assert geo.padded_numel == 2 * 11 * 7 * 3
    ng = geo.native(vector_width=16, threads=3, layout=1)
    assert (ng.n, ng.c, ng.hp, ng.wp, ng.kh, ng.kw, ng.sh, ng.sw, ng.dh, ng.dw) == (2, 3, 11, 7, 3, 2, 2, 1, 1, 2)
    assert (ng.oh, ng.ow, ng.nt, ng.cout, ng.cp, ng.kp, ng.bsz, ng.m, ng.nth) == (5, 5, 4, 5, 16, 32, 1, 6, 3)
    assert (ng.h, ng.w, ng.ph, ng.pw, ng.layout) == (9, 7, 1, 0, 1)


@pytest.mark.parametrize("b,n,cols", [(1, 1, 1), (3, 7, 1), (5, 1024, 16), (4, 10, 3), (2, 100, 7),
                                      (40, 999, 1),           # many refreshes of the engine's state
                                      (2, 2 ** 20 + 3, 1)])   # remainders past the doubles' range
def test_native_draw_is_torch_randperm(lib, b, n, cols):
    # the random scheme draws b permutations in one native call: exactly b torch.randperm calls'
    # permutations (as rows, or as rank grids of cols columns) and generator state afterwards
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.randperm(3, generator=ours), torch.randperm(3, generator=theirs)  # start mid-block
    out = ops_native.randperm_rows(b, n, ours, cols)
    ref = torch.stack([torch.randperm(n, generator=theirs) for _ in range(b)])  # (b, n)
    if cols > 1:
        m = -(-n // cols)
        ref = torch.cat([ref, ref.new_full((b, m * cols - n), n)], 1).view(b, m, cols).transpose(1, 2)
    assert torch.equal(out, ref)
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=theirs))


def test_native_draw_uses_the_default_generator_and_the_partition_is_unchanged(lib, monkeypatch):
    torch.manual_seed(3)
    fast = schemes.random_partition_index(6, 300, 7)
    after_fast = torch.rand(3)
    monkeypatch.setenv(native.ENV_SWITCH, "0")  # torch.randperm row by row
    torch.manual_seed(3)
    slow = schemes.random_partition_index(6, 300, 7)
    assert torch.equal(fast, slow) and torch.equal(after_fast, torch.rand(3))
    assert ops_native.randperm_rows(2, 5) is None  # the native path is off


def test_bench_kernels_script_times_the_three_kernels_of_both(lib, capsys):
    """scripts/bench_kernels.py (the README's kernel-by-kernel figures) runs and prints a ratio
    per kernel; no timing is asserted."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    times = mod.kernel_times("conv2", 2, True, 1)
    assert set(times) == {"forward", "input gradient", "weight gradient"}
    assert all(r > 0 and c > 0 for r, c in times.values())
    threads = torch.get_num_threads()
    try:
        mod.main(["--layer", "conv1", "--batch", "2", "--threads", "1", "--format", "nchw", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "conv1, batch 2, NCHW, 1 threads" in out
    assert sum(line.split()[-2] == "ratio" for line in out.splitlines()) == 4
