"""Native CPU kernels of the tiled convolution (``csrc/tiled_conv.cpp``) and of the random
scheme's draw (``csrc/randperm.cpp``), built on first use.

The pure-PyTorch path (:mod:`rapa.ops.torch_path`) gathers patches into a matrix and calls
batched GEMMs; on CPU that costs about twice a direct convolution. The native kernels compute
each (image, tile) group as an implicit GEMM straight from the image's padded channels-last
copy in per-thread scratch (an NCHW image is transposed there, and its result back), with
register-blocked vector code and torch's own OpenMP threads, skipping the patch entries in
the zero padding as oneDNN does, so the tiled layer costs 0.97-1.09x what ``nn.Conv2d`` costs
(forward and backward, the paper's layers, medians of ten runs; README, Benchmarks). They cover float32 on the CPU without
the ``image_pad`` mask, for ungrouped and depthwise (``groups == C == cout``, vectorised
across channels) layers; everything else (other grouped layers too), and any machine where
the build fails, takes the PyTorch path (same results up to float rounding). Every kernel
takes the call's geometry as one struct (:class:`rapa.ops.geometry.NativeGeometry`). They are
called through ctypes here (:class:`NativeTiledConv2dFn`); the tiled convolution's calls take
them through torch operators with their autograd in C++ where those can be built
(:mod:`rapa.ops.native_op`, handed the addresses of the kernels loaded here).

The source is compiled once per CPU type with the C++ compiler ``$CXX`` (default ``c++``,
``-O3 -march=native -fopenmp``; ``$RAPA_NATIVE_ARCH`` replaces ``native``, e.g. ``x86-64-v3``
for a cluster of mixed CPUs) into ``$RAPA_NATIVE_DIR`` (default ``~/.cache/rapa/native``);
the build takes a few seconds; a changed source (its hash) is rebuilt. These are read when
the kernels are first loaded. ``RAPA_NATIVE=0`` turns the native path off (read at every call).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from rapa.ops.geometry import NATIVE_FIELDS, ConvGeometry, NativeGeometry

SOURCES = tuple(Path(__file__).resolve().parents[1] / "csrc" / name for name in ("tiled_conv.cpp", "randperm.cpp"))
SOURCE = SOURCES[0]  # the convolution kernels (its struct Geo is checked at load)
ENV_SWITCH = "RAPA_NATIVE"  # "0": use the PyTorch path
ENV_DIR = "RAPA_NATIVE_DIR"
ENV_ARCH = "RAPA_NATIVE_ARCH"  # the -march target, default "native"
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

# every kernel takes the geometry, then this many tensor addresses; its int return is 0
_KERNELS = {"rapa_tiled_conv_fwd": 5, "rapa_tiled_conv_bwd_w": 5, "rapa_tiled_conv_bwd_x": 4,
            "rapa_dw_fwd": 5, "rapa_dw_bwd_w": 5, "rapa_dw_bwd_x": 4}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library, or "error": why there is none


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def build_dir() -> Path:
    """Where built libraries are kept: ``$RAPA_NATIVE_DIR`` or ``~/.cache/rapa/native``."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path("~/.cache/rapa/native").expanduser()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(force: bool = False) -> Path:
    """Compile the kernels for this CPU (cached by source, compiler, flags and CPU); return the
    shared library's path. Raises ``RuntimeError`` with the compiler's output if it fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    flags = (*FLAGS, f"-march={os.environ.get(ENV_ARCH) or 'native'}")
    src = b"\0".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(b"\0".join([src, cxx.encode(), " ".join(flags).encode(),
                                     _cpu_id().encode(), torch.__version__.encode()])).hexdigest()[:16]
    path = build_dir() / f"rapa_tiled_conv_{key}.so"
    if path.exists() and not force:
        return path
    return compile_shared(cxx, [*flags, *map(str, SOURCES)], path)


def compile_shared(cxx: str, args: list[str], path: Path) -> Path:
    """Run ``cxx args -o path`` into a temporary file beside ``path`` and move it there (atomic:
    concurrent builders, e.g. Ray workers, do not collide); ``RuntimeError`` with the compiler's
    output if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([*shlex.split(cxx), *args, "-o", tmp], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            sources = ", ".join(Path(a).name for a in args if a.endswith(".cpp"))
            raise RuntimeError(f"building {sources} with {cxx} failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; ``None`` (with one warning) if they
    cannot be built here."""
    if "lib" in _state or "error" in _state:
        return _state.get("lib")  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                lib = ctypes.CDLL(str(build()))
                _check_layout(lib)
                for name, nptr in _KERNELS.items():
                    getattr(lib, name).argtypes = [ctypes.POINTER(NativeGeometry)] + [ctypes.c_void_p] * nptr
                    getattr(lib, name).restype = ctypes.c_int
                lib.rapa_clear_scratch.argtypes = [ctypes.c_int64]
                lib.rapa_clear_scratch.restype = None
                lib.rapa_randperm_rows.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
                lib.rapa_randperm_rows.restype = ctypes.c_int
                lib.rapa_generator_state_bytes.restype = ctypes.c_int64
                _state["lib"] = lib
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                _state["error"] = str(err)
                warnings.warn(f"rapa: native CPU kernels unavailable, using the PyTorch path "
                              f"(slower): {err}", RuntimeWarning, stacklevel=3)
    return _state.get("lib")  # type: ignore[return-value]


def geometry_layout(lib: ctypes.CDLL) -> tuple[int, list[int]]:
    """``sizeof(Geo)`` of the loaded kernels and the byte offsets of its fields, in the order of
    :data:`rapa.ops.geometry.NATIVE_FIELDS`."""
    offsets = (ctypes.c_int64 * len(NATIVE_FIELDS))()
    lib.rapa_geometry_layout.restype = ctypes.c_int64
    size = lib.rapa_geometry_layout(offsets)
    return size, list(offsets)


def _check_layout(lib: ctypes.CDLL) -> None:
    """``RuntimeError`` unless the C++ ``struct Geo`` and :class:`NativeGeometry` agree."""
    size, offsets = geometry_layout(lib)
    mine = [getattr(NativeGeometry, name).offset for name in NATIVE_FIELDS]
    if size != ctypes.sizeof(NativeGeometry) or offsets != mine:
        raise RuntimeError(f"{SOURCE.name}'s struct Geo ({size} bytes, offsets {offsets}) does not match "
                           f"rapa.ops.geometry.NativeGeometry ({ctypes.sizeof(NativeGeometry)} bytes, {mine})")


def available() -> bool:
    """Whether the native kernels are built and loaded (building them if needed)."""
    return library() is not None


def enabled() -> bool:
    """Whether :func:`rapa.functional.tiled_conv2d` uses the native kernels for CPU float32:
    not switched off by ``RAPA_NATIVE=0``, and built."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and available()


def clear_scratch() -> None:
    """Free the native kernels' per-thread scratch (of the calling thread and torch's threads)."""
    lib = _state.get("lib")
    if lib is not None:
        lib.rapa_clear_scratch(torch.get_num_threads())  # type: ignore[attr-defined]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, tiled convolutions take the PyTorch path (sets ``RAPA_NATIVE=0``
    for the process, so not meant for concurrent threads); for comparisons and debugging."""
    old = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = old


def describe() -> str:
    """Which CPU implementation float32 tiled convolutions use here, for reports."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"PyTorch path ({ENV_SWITCH}=0)"
    lib = library()
    if lib is None:
        return f"PyTorch path (native kernels unavailable: {str(_state.get('error')).splitlines()[0]})"
    arch = os.environ.get(ENV_ARCH) or "native"
    return f"native kernels (-march={arch}, {lib.rapa_vector_width()} floats per vector)"


def randperm_rows(b: int, n: int, generator: torch.Generator | None = None, cols: int = 1) -> Tensor | None:
    """``b`` rows of ``torch.randperm(n, generator=generator)`` (CPU, int64) in one native call:
    the same permutations as ``b`` calls of ``torch.randperm`` with the generator (``None``:
    torch's default CPU generator), which is left in the same state; ``None`` where the native
    kernels are off or do not reproduce ``torch.randperm`` here (checked once per process).
    With ``cols > 1`` each row ``perm`` is returned as its rank grid ``(cols, M)``,
    ``M = ceil(n / cols)``: ``out[r, c, j] = perm[r, j * cols + c]``, ``n`` past its end
    (shape (b, cols, M); cols = 1: (b, n)). The generator's state is read, advanced and set
    back: Python threads drawing from one generator at the same time may get the same rows."""
    if not enabled() or (generator is not None and generator.device.type != "cpu"):
        return None
    if "randperm" not in _state:
        _state["randperm"] = _randperm_matches_torch()
    if not _state["randperm"]:
        return None
    return _randperm_native(b, n, generator, cols)


def _randperm_native(b: int, n: int, generator: torch.Generator | None, cols: int = 1) -> Tensor | None:
    lib = library()
    gen = torch.default_generator if generator is None else generator  # (torch.get/set_rng_state's)
    state = gen.get_state()  # a fresh, dense uint8 tensor
    if "state_bytes" not in _state:
        _state["state_bytes"] = lib.rapa_generator_state_bytes()  # type: ignore[union-attr]
    if state.numel() < _state["state_bytes"]:  # type: ignore[operator]
        return None
    out = torch.empty((b, n) if cols == 1 else (b, cols, -(-n // cols)), dtype=torch.int64)
    if lib.rapa_randperm_rows(state.data_ptr(), b, n, cols, torch.get_num_threads(),  # type: ignore[union-attr]
                              out.data_ptr()) != 0:
        return None
    gen.set_state(state)
    return out


def _randperm_matches_torch() -> bool:
    """Whether the native draw gives torch.randperm's permutations and generator state."""
    for seed, b, n in ((0, 3, 1), (1, 4, 7), (2, 2, 1000)):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.randperm(5, generator=ours), torch.randperm(5, generator=theirs)  # mid-block positions too
        rows = _randperm_native(b, n, ours)
        if rows is None or not torch.equal(rows, torch.stack([torch.randperm(n, generator=theirs)
                                                                for _ in range(b)])):
            return False
        grid = _randperm_native(b, n, ours, 3)
        full = torch.stack([torch.randperm(n, generator=theirs) for _ in range(b)])
        full = torch.cat([full, full.new_full((b, -n % 3), n)], 1)  # (b, 3 * M)
        if grid is None or not torch.equal(grid, full.view(b, -1, 3).transpose(1, 2)):
            return False
        if not torch.equal(ours.get_state(), theirs.get_state()):
            return False
    return True


def supports(x: Tensor, weight: Tensor, mask: Tensor | None) -> bool:
    """Whether this call can take the native path."""
    return (mask is None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and enabled())


def supports_depthwise(x: Tensor, weight: Tensor, mask: Tensor | None, groups: int) -> bool:
    """Whether this grouped call can take the native depthwise kernels: one input and one
    output channel per group (``groups == C == cout``), CPU float32, no ``image_pad`` mask.
    Other grouped layers (channel multipliers, ``groups < C``) take the PyTorch path."""
    return groups == x.shape[1] == weight.shape[1] and weight.shape[2] == 1 and supports(x, weight, mask)


def _ptr(t: Tensor | None) -> int | None:
    """The address the kernels read or write; they assume dense row-major memory. ``t`` must
    stay referenced until the kernel returns (never ``_ptr(x.contiguous())`` inline: the copy
    would be freed before the call)."""
    if t is None:
        return None
    if not t.is_contiguous():
        raise RuntimeError(f"rapa.native: a non-contiguous tensor of shape {tuple(t.shape)} and "
                           f"strides {t.stride()} reached the kernels (a bug in rapa)")
    return t.data_ptr()


def _prepare(index: Tensor, geo: ConvGeometry, layout: int = 0) -> tuple[ctypes.CDLL, NativeGeometry, Tensor]:
    """What every forward needs: the library, the geometry struct (``layout`` as
    :meth:`ConvGeometry.native`) and the index as dense int64."""
    lib = library()
    assert lib is not None, "native kernels called without a library (check supports() first)"
    return lib, _native_geometry(geo, torch.get_num_threads(), layout), index.to(torch.int64).contiguous()


@functools.lru_cache(maxsize=512)
def _native_geometry(geo: ConvGeometry, threads: int, layout: int) -> NativeGeometry:
    """``geo.native(...)`` for the loaded kernels, memoised (shapes repeat from call to call):
    the kernels only read it, and no caller may change it."""
    return geo.native(library().rapa_vector_width(), threads, layout)  # type: ignore[union-attr]


class NativeTiledConv2dFn(torch.autograd.Function):
    """Autograd function of the tiled convolution on the native kernels (CPU, float32).

    Same arguments and results as :class:`rapa.ops.torch_path.TiledConv2dFn` without the mask.
    NCHW and channels-last tensors are read as they are (the kernels pad, and transpose, one
    image at a time in cache); the output and the input gradient have ``x``'s memory format.
    Saves only ``x``, ``weight`` and the index; the backward pads the input again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, geo: ConvGeometry,
                covered: bool) -> Tensor:
        nhwc = _is_nhwc(x)
        lib, ngeo, index = _prepare(index, geo, (0 if nhwc else 1) | (0 if covered else 4))
        wc = weight.contiguous()  # (nt, cout, C, kh, kw); kept alive through the call
        bias_c = None if bias is None else bias.contiguous()  # (nt, cout)
        n, oh, ow, cout = geo.batch, *geo.out_size, geo.out_channels
        xc = _dense(x, nhwc)  # (N, H, W, C) or (N, C, H, W)
        out = (x.new_empty if covered else x.new_zeros)((n, oh, ow, cout) if nhwc else (n, cout, oh, ow))
        lib.rapa_tiled_conv_fwd(ctypes.byref(ngeo), _ptr(xc), _ptr(wc), _ptr(bias_c), _ptr(index),
                                _ptr(out))  # (the kernel packs the weight and bias)
        ctx.save_for_backward(x, weight, index)
        ctx.geo, ctx.threads, ctx.has_bias, ctx.nhwc = geo, ngeo.nth, bias is not None, nhwc
        return out.permute(0, 3, 1, 2) if nhwc else out  # (N, cout, oh, ow)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        lib = library()
        x, weight, index = ctx.saved_tensors
        geo, nhwc = ctx.geo, ctx.nhwc
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        n, c, h, w = x.shape
        nt, cout, _, kh, kw = weight.shape
        g_nhwc = _is_nhwc(grad_out)
        g = _dense(grad_out, g_nhwc)  # (N, oh, ow, cout) or (N, cout, oh, ow)
        ngeo = _native_geometry(geo, ctx.threads, (0 if nhwc else 1) | (0 if g_nhwc else 2))
        gx = gw = gb = None
        if need_w or need_b:
            xc = _dense(x, nhwc) if need_w else None
            gw = x.new_empty(nt, cout, c, kh, kw) if need_w else None
            gb = x.new_empty(nt, cout) if need_b else None
            lib.rapa_tiled_conv_bwd_w(ctypes.byref(ngeo), _ptr(xc), _ptr(g), _ptr(index), _ptr(gw), _ptr(gb))
        if need_x:
            gx = x.new_empty((n, h, w, c) if nhwc else (n, c, h, w))
            wc = weight.contiguous()  # kept alive through the call
            lib.rapa_tiled_conv_bwd_x(ctypes.byref(ngeo), _ptr(g), _ptr(wc), _ptr(index), _ptr(gx))
            if nhwc:
                gx = gx.permute(0, 3, 1, 2)  # (N, C, H, W) channels-last memory
        return gx, gw, gb, None, None, None


class NativeDepthwiseFn(torch.autograd.Function):
    """Autograd function of a depthwise tiled convolution (``groups == C == cout``) on the
    native kernels (CPU, float32); arguments as :class:`NativeTiledConv2dFn`, ``weight``
    (nt, C, 1, kh, kw). Vectorised across channels (``rapa_dw_*`` in the C++ source), work
    split by images; NCHW and channels-last tensors are read and written as they are (the
    kernels transpose one image at a time in cache), and the output has ``x``'s layout."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, geo: ConvGeometry,
                covered: bool) -> Tensor:
        nhwc = _is_nhwc(x)
        lib, ngeo, index = _prepare(index, geo, 0 if nhwc else 1)
        bp = None if bias is None else _padded(bias, 1, ngeo.cp)  # (nt, cp)
        n, c, oh, ow = geo.batch, geo.in_channels, *geo.out_size
        nt, (kh, kw) = geo.tiles, geo.kernel
        xc = _dense(x, nhwc)  # (N, H, W, C) view or (N, C, H, W)
        wt = _padded(weight.view(nt, c, kh * kw).transpose(1, 2), 2, ngeo.cp)  # (nt, kh*kw, cp)
        out = x.new_empty((n, oh, ow, c) if nhwc else (n, c, oh, ow))
        lib.rapa_dw_fwd(ctypes.byref(ngeo), _ptr(xc), _ptr(wt), _ptr(bp), _ptr(index), _ptr(out))
        ctx.save_for_backward(x, wt, index)
        ctx.geo, ctx.threads, ctx.has_bias, ctx.kernel, ctx.nhwc = geo, ngeo.nth, bias is not None, (kh, kw), nhwc
        return out.permute(0, 3, 1, 2) if nhwc else out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        lib = library()
        x, wt, index = ctx.saved_tensors
        (kh, kw), nhwc = ctx.kernel, ctx.nhwc
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        n, c, h, w = x.shape
        nt = wt.shape[0]
        g_nhwc = _is_nhwc(grad_out)
        g = _dense(grad_out, g_nhwc)
        ngeo = _native_geometry(ctx.geo, ctx.threads, (0 if nhwc else 1) | (0 if g_nhwc else 2))
        gx = gw = gb = None
        if need_w or need_b:
            xc = _dense(x, nhwc) if need_w else None
            gw = x.new_empty(nt, c, 1, kh, kw) if need_w else None
            gb = x.new_empty(nt, c) if need_b else None
            lib.rapa_dw_bwd_w(ctypes.byref(ngeo), _ptr(xc), _ptr(g), _ptr(index), _ptr(gw), _ptr(gb))
        if need_x:
            gx = x.new_empty((n, h, w, c) if nhwc else (n, c, h, w))
            lib.rapa_dw_bwd_x(ctypes.byref(ngeo), _ptr(g), _ptr(wt), _ptr(index), _ptr(gx))
            if nhwc:
                gx = gx.permute(0, 3, 1, 2)
        return gx, gw, gb, None, None, None


def _padded(w: Tensor, lead: int, width: int) -> Tensor:
    """A dense copy of the view ``w`` in one copy: its dimensions after the first ``lead``
    merged into one and zero-padded to ``width`` (the kernels read rows of whole vectors)."""
    inner = math.prod(w.shape[lead:])
    out = (w.new_zeros if width != inner else w.new_empty)(*w.shape[:lead], width)
    out[..., :inner].view(w.shape).copy_(w)
    return out


def _is_nhwc(x: Tensor) -> bool:
    """Whether ``x`` (N, C, H, W) has its channels innermost (channels-last memory, or a channel
    slice of it), so that the kernels read it as (N, H, W, C); one channel counts as NCHW."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) >= x.shape[1]


def _dense(x: Tensor, nhwc: bool) -> Tensor:
    """``x`` (N, C, H, W) as the kernels read it: dense (N, H, W, C) when ``nhwc``, else dense
    (N, C, H, W) (views where ``x`` already is)."""
    return _nhwc(x) if nhwc else x.contiguous()


def _nhwc(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) as a contiguous ``(N, H, W, C)`` tensor (a view if channels-last)."""
    return x.permute(0, 2, 3, 1).contiguous()
