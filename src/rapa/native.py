"""The native CPU kernels of the tiled convolution: the public names of :mod:`rapa.ops.native`.

``rapa.native.available()``, ``enabled()``, ``disabled()``, ``describe()``, ``build()`` and
the environment variables ``RAPA_NATIVE`` (``0``: the PyTorch path), ``RAPA_NATIVE_DIR`` and
``RAPA_NATIVE_ARCH`` are documented there; this module re-exports them (it holds no code).
Tiled layers call them through the C++ operators of :mod:`rapa.ops.native_op`
(``RAPA_NATIVE_OP=0``: through ctypes).
"""

from __future__ import annotations

from rapa.ops.native import (ENV_ARCH, ENV_DIR, ENV_SWITCH, FLAGS, SOURCE, NativeDepthwiseFn, NativeTiledConv2dFn,
                             available, build, build_dir, clear_scratch, describe, disabled, enabled, library,
                             supports, supports_depthwise)

__all__ = ["ENV_ARCH", "ENV_DIR", "ENV_SWITCH", "FLAGS", "SOURCE", "NativeDepthwiseFn", "NativeTiledConv2dFn",
           "available", "build", "build_dir", "clear_scratch", "describe", "disabled", "enabled", "library",
           "supports", "supports_depthwise"]
