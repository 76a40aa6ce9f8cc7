"""rapa: RAPA-ConvNets, convolutions with replicated kernel matrices for analog arrays.

Rasch, Gokmen, Rigotti & Haensch, "RAPA-ConvNets: Modified Convolutional Networks for
Accelerated Training on Architectures With Analog Arrays", Front. Neurosci. 13:753 (2019).

The public names below are imported on first use (PEP 562), so that ``import rapa`` and the
``rapa`` command's help and argument errors do not wait for torch to load.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (a module's own name: the module itself)
_EXPORTS: dict[str, str] = {
    "functional": "rapa.functional", "schemes": "rapa.schemes", "SCHEMES": "rapa.schemes",
    "convert": "rapa.convert", "balanced_tiles": "rapa.convert",
    "conversion_summary": "rapa.summary",
    "WithinChannelLRN": "rapa.lrn", "within_channel_lrn": "rapa.lrn", "lsuv_": "rapa.lsuv",
    "ENLARGED_CHANNELS": "rapa.models", "ConvNet": "rapa.models", "build_model": "rapa.models",
    "MixedPool2d": "rapa.pooling", "StochasticPool2d": "rapa.pooling", "make_pool": "rapa.pooling",
    "TiledConv2d": "rapa.tiled_conv",
    "adaptive_vote": "rapa.voting", "majority_vote": "rapa.voting", "vote_predictions": "rapa.voting",
}

__all__ = [
    "TiledConv2d", "convert", "balanced_tiles", "conversion_summary", "functional", "schemes", "SCHEMES",
    "ConvNet", "build_model", "ENLARGED_CHANNELS",
    "StochasticPool2d", "MixedPool2d", "make_pool", "WithinChannelLRN", "within_channel_lrn",
    "majority_vote", "adaptive_vote", "vote_predictions", "lsuv_", "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access and cache the value."""
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rapa' has no attribute {name!r}")
    module = importlib.import_module(target)
    value = getattr(module, name, module)  # rapa.functional: the module; rapa.convert: the function
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The ``rapa`` module: importing the submodule ``rapa.convert`` does not rebind the
    function ``rapa.convert`` to that module (as the import system would)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "convert" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
