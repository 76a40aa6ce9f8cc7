"""How every preset's weight matrices are put on arrays (SPEC §5): the one mapping.

Every preset (``ideal``, ``rpu-baseline``, ``idealized``, ``aihwkit:NAME``) goes through
:func:`map_arrays`, which sets, with aihwkit 1.2.0's own means:

* one array per weight matrix, of exactly its size (``max_input_size = 0``: no splitting
  at 512 rows), as the paper assumes (§3.2: "each kernel replica occupies a separate
  crossbar array of sufficient size and exact dimensions");
* **weight scaling** (Rasch, Gokmen & Haensch 2019, arXiv 1906.02698, "weight scaling"):
  aihwkit's ``MappingParameter.weight_scaling_omega``. When a layer's weights are written
  (conversion from the digital net, or a load), each array gets one fixed digital output
  scale ``alpha = max|W| / omega`` and holds ``W / alpha``, so its largest weight sits at
  ``omega`` (a fraction of the device's bound) whatever the layer's initialisation. The
  digital scale is exact (a float multiply after the ADC) and is applied to the gradient
  before the pulsed update, so SGD acts on the logical weights ``W`` at the given rate;
  one pulse changes a logical weight by ``alpha * dw_min``. Without it (omega = 0, the old
  rapa default) weights are written 1:1, and Caffe's std-1e-4 conv1 sits below one device
  step of 2.5e-4: the layer is pulse noise.
* **aihwkit's output-bound gradient mask, off where it is wrong.** aihwkit's training
  tiles zero the input gradient wherever a forward output reaches
  ``out_scale * out_bound * 0.999``. That is right for a plain ADC that clips at the
  bound, but the value it tests is the output *after* noise management has multiplied
  the ADC reading back by the input's abs-max and bound management has undone its input
  reductions: with noise or bound management on (every pulsed preset here), an output of
  12 is no saturation at all, and the mask silenced the fully connected layer's gradient
  as soon as its logits passed 12, so no conv layer learned any more. :class:`ManagedAnalogTile`
  keeps aihwkit's analog tile and switches the mask off exactly when the forward pass
  uses noise or bound management (bound management, iterative, recomputes a saturated
  output with a reduced input, so nothing is clipped that the mask would need to catch).

Noise management (``ABS_MAX``), iterative bound management and update management
(pulse-train lengths balanced between ``x`` and ``d``, train length adapted to the update
size) are set in the presets' ``IOParameters`` / ``UpdateParameters`` and done by
aihwkit's simulator itself; ``tests/test_analog_mapping.py`` checks that they act.

Imports aihwkit: import this module only where aihwkit is required.
"""

from __future__ import annotations

from typing import Any

from rapa.analog.backend import require_aihwkit

require_aihwkit()  # loads aihwkit's simulator with its BLAS threads sized (rapa.analog.backend)
from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType
from aihwkit.simulator.tiles.analog import AnalogTile

__all__ = ["ManagedAnalogTile", "io_managed", "map_arrays", "weight_scaling_omega"]


def io_managed(io: Any) -> bool:
    """Whether an ``IOParameters`` rescales the forward output (noise or bound management)."""
    if io is None or getattr(io, "is_perfect", False):
        return False
    nm = getattr(io, "noise_management", NoiseManagementType.NONE)
    bm = getattr(io, "bound_management", BoundManagementType.NONE)
    return nm != NoiseManagementType.NONE or bm != BoundManagementType.NONE


class ManagedAnalogTile(AnalogTile):
    """aihwkit's ``AnalogTile`` without its output-bound gradient mask when the forward
    pass uses noise or bound management (see the module docstring: the mask compares
    rescaled outputs with the ADC's bound and zeroes gradients that nothing clipped)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if io_managed(getattr(self.rpu_config, "forward", None)):
            self.handle_output_bound = False


def weight_scaling_omega(config: Any, weight_range: float) -> float:
    """``omega`` for ``config``: ``weight_range`` times the device's mean upper bound
    ``w_max`` (1 for devices that name none); 0 (no scaling) for floating-point tiles."""
    device = getattr(config, "device", None)
    if device is None or type(device).__name__ == "FloatingPointDevice" or weight_range <= 0:
        return 0.0
    w_max = getattr(device, "w_max", None)
    return float(weight_range) * (abs(float(w_max)) if w_max else 1.0)


def map_arrays(config: Any, weight_range: float, digital_bias: bool | None = None) -> Any:
    """Set ``config`` (an aihwkit ``RPUConfig``) to rapa's mapping, in place; returns it.

    One array per weight matrix; weight scaling to ``weight_range`` of the device's range
    (0: none); the managed tile class for aihwkit's pulsed ``AnalogTile``; ``digital_bias``
    when given.
    """
    mapping = getattr(config, "mapping", None)
    if mapping is not None:
        mapping.max_input_size = 0
        mapping.max_output_size = 0
        mapping.weight_scaling_omega = weight_scaling_omega(config, weight_range)
        mapping.weight_scaling_columnwise = False
        mapping.learn_out_scaling = False
        if digital_bias is not None:
            mapping.digital_bias = digital_bias
    if getattr(config, "tile_class", None) is AnalogTile:
        config.tile_class = ManagedAnalogTile
    return config
