"""The kernels of the tiled convolution, below the public API of :mod:`rapa.functional`.

* :mod:`rapa.ops.geometry`: the sizes of one call, one typed value (a C struct for the kernels);
* :mod:`rapa.ops.workspace`: per-thread scratch buffers kept between calls;
* :mod:`rapa.ops.patches`: the patch plan (where every slot reads and writes) and the patch
  gather of the analog layer;
* :mod:`rapa.ops.torch_path`: the PyTorch autograd path (any device and dtype);
* :mod:`rapa.ops.native`: the native CPU kernels (``csrc/tiled_conv.cpp``), built on first use;
* :mod:`rapa.ops.reference`: the dense reference (every tile's convolution).
"""
