"""The tiled convolution on the native kernels as torch operators with their autograd in C++
(``csrc/tiled_conv_op.cpp``), built on first use: ``torch.ops.rapa.random_tiled_conv`` (the
random scheme's draw included) and ``torch.ops.rapa.tiled_conv`` (a given index).

Through ctypes and a Python ``autograd.Function`` (:class:`rapa.ops.native.NativeTiledConv2dFn`)
a call costs about 40 us more Python per training step, and the random scheme's draw a third
ctypes call: 5-7% of the paper's conv1 and conv2 at batch 10.
:func:`rapa.functional.random_native_conv2d` (a random layer of more than one tile) takes
:func:`op`, every other native call of :func:`rapa.functional.tiled_conv2d` :func:`tiled`:
one C++ call per forward (the draw from the generator's state, the forward kernel, the saved
tensors) and a backward without Python. They call the kernels that :mod:`rapa.ops.native`
loaded, whose addresses they are handed at load, so the results, the draw and the generator
state are those of the ctypes path bit for bit (checked once per process on small calls before
they are used).

They are compiled against torch's own headers and libraries (``-std=c++20``, about 15 s, cached
in :func:`rapa.ops.native.build_dir` by source, compiler and torch version). Where that fails,
or with ``RAPA_NATIVE_OP=0`` (read at every call), the ctypes path runs instead: the same
results, a few percent slower; :func:`error` tells why they are not used.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Callable

import torch

from rapa.ops import native
from rapa.ops.geometry import NATIVE_FIELDS, ConvGeometry

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "tiled_conv_op.cpp"
ENV_SWITCH = "RAPA_NATIVE_OP"  # "0": the ctypes path
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++20")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops": the loaded operators (random, tiled), or "error": why there are none


def _torch_flags() -> list[str]:
    """Compiler and linker flags for torch's headers and libraries (the installed wheel's)."""
    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]


def build(force: bool = False) -> Path:
    """Compile the operators (cached by source, compiler, flags and torch version); return the
    shared library's path. ``RuntimeError`` with the compiler's output if it fails."""
    cxx = native._compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    flags = [*FLAGS, *_torch_flags()]
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cxx.encode(), " ".join(flags).encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    path = native.build_dir() / f"rapa_tiled_conv_op_{key}.so"
    if path.exists() and not force:
        return path
    return native.compile_shared(cxx, [str(SOURCE), *flags], path)


def _load() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """Build, load and hand the operators the kernels; check them against the ctypes path."""
    lib = native.library()
    if lib is None:
        raise RuntimeError(f"the native kernels are unavailable: {native._state.get('error')}")
    path = build()
    torch.ops.load_library(str(path))  # registers rapa::random_tiled_conv and rapa::tiled_conv
    handle = ctypes.CDLL(str(path))
    handle.rapa_set_kernels.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64]
    handle.rapa_set_kernels.restype = None
    address = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
               for name in ("rapa_tiled_conv_fwd", "rapa_tiled_conv_bwd_w", "rapa_tiled_conv_bwd_x",
                            "rapa_randperm_rows")]
    handle.rapa_set_kernels(*address, lib.rapa_generator_state_bytes())
    ops = torch.ops.rapa.random_tiled_conv.default, torch.ops.rapa.tiled_conv.default
    if not _agrees(*ops):
        raise RuntimeError(f"{path.name} does not reproduce the ctypes path (outputs, gradients or draw)")
    return ops


def _agrees(random_op: Callable[..., torch.Tensor], tiled_op: Callable[..., torch.Tensor]) -> bool:
    """Whether the operators give the ctypes path's output, gradients and generator state on
    small calls: 3x3 kernels on 8x4 images, 4 tiles of 8 pixels, both memory formats; the
    random draw, and a given index with empty slots (with gradients on and float32 CPU tensors
    whatever the caller's mode and defaults are)."""
    geo = ConvGeometry(2, 3, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), (8, 4), 4, 4, 2, 8)
    hgeo = dataclasses.replace(geo, index_batch=1)  # the given index: one row for both images
    cpu = {"dtype": torch.float32, "device": "cpu"}
    with torch.inference_mode(False), torch.enable_grad():
        holes = torch.randperm(32, generator=torch.Generator().manual_seed(4)).view(1, 4, 8)  # (B, nt, M)
        holes = holes.masked_fill(torch.arange(8) >= 6, 32)  # 2 empty slots per tile: 8 pixels not listed
        for channels_last in (False, True):
            x = torch.randn(2, 3, 8, 4, generator=torch.Generator().manual_seed(0), **cpu)
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            w = torch.randn(4, 4, 3, 3, 3, generator=torch.Generator().manual_seed(1), **cpu)  # (nt, cout, C, kh, kw)
            b = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), **cpu)  # (nt, cout)
            g = torch.arange(2 * 4 * 8 * 4, **cpu).view(2, 4, 8, 4).sin()
            for given in (False, True):
                results = []
                for use_op in (True, False):
                    gen = torch.Generator().manual_seed(3)
                    xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
                    if given:
                        y = (tiled_op(xs, ws, bs, holes, fields(hgeo, torch.get_num_threads()), False) if use_op
                             else native.NativeTiledConv2dFn.apply(xs, ws, bs, holes, hgeo, False))
                    elif use_op:
                        y = random_op(xs, ws, bs, gen, fields(geo, torch.get_num_threads()))
                    else:
                        index = native.randperm_rows(geo.batch, geo.num_pixels, gen, geo.tiles)  # (N, nt, M)
                        if index is None:  # the native draw is not torch.randperm's here
                            return False
                        y = native.NativeTiledConv2dFn.apply(xs, ws, bs, index, geo, True)
                    y.backward(g)
                    results.append((y.detach(), xs.grad, ws.grad, bs.grad, gen.get_state()))
                if not all(torch.equal(a, b) for a, b in zip(*results)):
                    return False
    return True


@functools.lru_cache(maxsize=512)
def fields(geo: ConvGeometry, threads: int) -> tuple[int, ...]:
    """The operator's ``geo`` argument: the kernels' struct fields in the order of
    :data:`rapa.ops.geometry.NATIVE_FIELDS` (its layout bits set by the operator), memoised."""
    ngeo = native._native_geometry(geo, threads, 0)
    return tuple(getattr(ngeo, name) for name in NATIVE_FIELDS)


def _ops() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """Both operators, building them on first use; ``None`` where they are not to be used."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if "ops" in _state or "error" in _state:
        return _state.get("ops")  # type: ignore[return-value]
    with _lock:
        if "ops" not in _state and "error" not in _state:
            try:
                _state["ops"] = _load()
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                _state["error"] = str(err)
    return _state.get("ops")  # type: ignore[return-value]


def op() -> Callable[..., torch.Tensor] | None:
    """``torch.ops.rapa.random_tiled_conv`` ready to call, ``(x, weight, bias, generator,
    fields(geo, threads))``, building it on first use; ``None`` where it is switched off
    (``RAPA_NATIVE_OP=0``), the native kernels are off or their draw does not reproduce
    ``torch.randperm`` here, or it cannot be built (:func:`error`)."""
    ops = _ops()
    return None if ops is None else ops[0]


def tiled() -> Callable[..., torch.Tensor] | None:
    """``torch.ops.rapa.tiled_conv`` ready to call, ``(x, weight, bias, index, fields(geo,
    threads), covered)`` with an int64 index (B, nt, M); ``None`` as for :func:`op`."""
    ops = _ops()
    return None if ops is None else ops[1]


def error() -> str | None:
    """Why the operators are not used (their build or check failed), or ``None``."""
    return _state.get("error")  # type: ignore[return-value]


def describe() -> str:
    """How the native kernels are called here, for reports (builds the operators if they are
    not built yet)."""
    if not native.enabled():
        return "no operators (no native kernels)"
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"called through ctypes ({ENV_SWITCH}=0)"
    if _ops() is None:
        return f"called through ctypes (operators unavailable: {str(error()).splitlines()[0]})"
    return "called through C++ operators (rapa::random_tiled_conv, rapa::tiled_conv; autograd in C++)"
