"""Analog array presets: which aihwkit ``RPUConfig`` every replica (tile) gets (SPEC §5).

* ``ideal``: a perfect analog tile. aihwkit's ``FloatingPointRPUConfig``
  (``FloatingPointDevice``): no converters, no noise, no bounds, updates applied exactly.
  A RAPA net trained with it is the floating-point ("FP") column of the paper's Table 1.
* ``rpu-baseline``: the RPU baseline of Rasch, Gokmen & Haensch 2019 (arXiv 1906.02698),
  with the changes of the RAPA paper §3.2: a constant-step device (the model of Gokmen &
  Vlasov 2016) with four times more states (``dw_min = 0.00025``) and symmetric switching
  on average; 30% device-to-device and 30% cycle-to-cycle variation of the step; saturating
  bounds ``+-0.6`` with 30% device-to-device variation; 7-bit DAC, 9-bit ADC, output noise,
  noise, bound and update management, stochastic pulse trains of at most 31 pulses; every
  replica its own array of exact size (no splitting) with the bias as an extra column.
* ``idealized``: aihwkit's ``IdealizedPreset``, the same as ``aihwkit:IdealizedPreset``.
* ``aihwkit:NAME``: any preset class of :mod:`aihwkit.simulator.presets` by name, e.g.
  ``aihwkit:IdealizedPreset`` (a ``ConstantStepDevice`` with ``dw_min = 0.0002``, bounds
  ``+-1`` and the same converters, scaled to that range; also citing arXiv 1906.02698).
  Its mapping is set to one array per replica, as for the other presets.

This module does not import aihwkit until :meth:`AnalogPreset.rpu_config` is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

from rapa.errors import RapaError

WEIGHT_RANGE = 0.5
"""Default weight scaling of the pulsed presets: largest weight of every array at half the
device's mean bound (room to grow, and below most devices' varied bounds)."""


@dataclass
class AnalogPreset:
    """Base of the presets: a named factory of aihwkit ``RPUConfig`` objects."""

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""

    def rpu_config(self, construction_seed: int = 0) -> Any:
        """A fresh aihwkit ``RPUConfig`` for one array. ``construction_seed`` (non-zero)
        fixes the array's device-to-device variations; 0 lets aihwkit draw it from the clock."""
        raise NotImplementedError

    @property
    def pulsed(self) -> bool:
        """Whether the arrays are updated by (stochastic) pulses, not exactly."""
        return True


def _set_construction_seed(config: Any, seed: int) -> Any:
    device = getattr(config, "device", None)
    if device is not None and hasattr(device, "construction_seed"):
        device.construction_seed = int(seed)
    return config


def _mapped(config: Any, weight_range: float, digital_bias: bool | None = None) -> Any:
    """``config`` through :func:`rapa.analog.mapping.map_arrays` (imports aihwkit)."""
    from rapa.analog.mapping import map_arrays

    return map_arrays(config, weight_range, digital_bias)


@dataclass
class IdealPreset(AnalogPreset):
    """A perfect analog tile: exact matrix products and exact (non-pulsed) SGD updates.

    aihwkit ``FloatingPointRPUConfig`` with ``FloatingPointDevice``; no DAC/ADC, noise or
    weight bounds. Equals the digital layer up to float rounding.
    """

    name: ClassVar[str] = "ideal"
    source: ClassVar[str] = "aihwkit FloatingPointRPUConfig / FloatingPointDevice (perfect tile)"

    digital_bias: bool = True
    """Keep each replica's bias in digital (it is then an ordinary SGD parameter)."""

    def rpu_config(self, construction_seed: int = 0) -> Any:
        from aihwkit.simulator.configs import FloatingPointRPUConfig

        return _mapped(FloatingPointRPUConfig(), 0.0, self.digital_bias)

    @property
    def pulsed(self) -> bool:
        return False


@dataclass
class RPUBaselinePreset(AnalogPreset):
    """RPU baseline of Rasch et al. 2019 (arXiv 1906.02698) as in the RAPA paper §3.2.

    Device: Gokmen & Vlasov 2016 (Front. Neurosci. 10:333) constant-step model, number
    of states increased by 4 and ideally symmetric on average (RAPA paper §3.2). Periphery:
    Gokmen & Vlasov 2016 / Gokmen et al. 2017 (Front. Neurosci. 11:538), aihwkit's
    defaults for ``IOParameters`` and ``UpdateParameters`` (noise management ``ABS_MAX``,
    iterative bound management, update management and dynamic pulse-train length).
    """

    name: ClassVar[str] = "rpu-baseline"
    source: ClassVar[str] = ("Rasch, Gokmen & Haensch 2019, arXiv 1906.02698 (RPU baseline); "
                             "RAPA paper section 3.2; Gokmen & Vlasov 2016")

    dw_min: float = 0.00025
    """Mean weight change of one pulse (Gokmen & Vlasov's 0.001 / 4: four times more states)."""
    dw_min_dtod: float = 0.3
    """Device-to-device variation of ``dw_min`` (relative std)."""
    dw_min_std: float = 0.3
    """Cycle-to-cycle variation of every pulse's step (relative std)."""
    up_down: float = 0.0
    """Mean up/down step asymmetry: 0, symmetric on average (paper §3.2)."""
    up_down_dtod: float = 0.01
    """Device-to-device variation of the up/down asymmetry (Gokmen & Vlasov 2016, aihwkit default)."""
    w_max: float = 0.6
    """Mean upper weight bound (the lower one is ``-w_max``), saturating."""
    w_max_dtod: float = 0.3
    """Device-to-device variation of both bounds (relative std)."""
    inp_bits: int = 7
    """DAC resolution: input steps ``1 / (2**bits - 2)`` of the input range."""
    out_bits: int = 9
    """ADC resolution (sign included): output steps ``1 / (2**bits - 2)`` of the output range."""
    out_bound: float = 12.0
    """ADC saturation, in units of a full input times a ``w_max = 1`` weight (Gokmen et al. 2017)."""
    out_noise: float = 0.06
    """Additive Gaussian output noise (std, same units) of every forward and backward read."""
    desired_bl: int = 31
    """Maximal number of pulses in a stochastic update pulse train."""
    digital_bias: bool = False
    """False: each replica's bias is an extra column of its array, updated by pulses."""
    perfect_backward: bool = False
    """True: the backward pass (the input gradient, ``W^T d``) is read exactly (aihwkit's
    ``is_perfect``: no converters, noise or bounds); a diagnostic, not the paper's hardware."""
    perfect_update: bool = False
    """True: every update is SGD's exactly, ``W -= lr * d^T x``, then clipped to each device's
    own bounds (aihwkit's ``PulseType.NONE_WITH_DEVICE``: no pulse trains, no step variation or
    asymmetry); a diagnostic, not the paper's hardware."""
    weight_range: float = WEIGHT_RANGE
    """Weight scaling (aihwkit's ``weight_scaling_omega = weight_range * w_max``): every
    array's largest weight is written at this fraction of the mean bound, with one exact
    digital output scale per array (:mod:`rapa.analog.mapping`); 0: written 1:1."""

    def rpu_config(self, construction_seed: int = 0) -> Any:
        from aihwkit.simulator.configs import ConstantStepDevice, SingleRPUConfig
        from aihwkit.simulator.parameters import (BoundManagementType, IOParameters,
                                                  NoiseManagementType, PulseType, UpdateParameters)

        def io() -> Any:
            return IOParameters(
                inp_res=1.0 / (2**self.inp_bits - 2), inp_bound=1.0, inp_sto_round=False,
                out_res=1.0 / (2**self.out_bits - 2), out_bound=self.out_bound,
                out_noise=self.out_noise,
                noise_management=NoiseManagementType.ABS_MAX,
                bound_management=BoundManagementType.ITERATIVE,
            )

        device = ConstantStepDevice(
            dw_min=self.dw_min, dw_min_dtod=self.dw_min_dtod, dw_min_std=self.dw_min_std,
            up_down=self.up_down, up_down_dtod=self.up_down_dtod,
            w_max=self.w_max, w_min=-self.w_max, w_max_dtod=self.w_max_dtod,
            w_min_dtod=self.w_max_dtod, construction_seed=int(construction_seed),
        )
        update = UpdateParameters(
            desired_bl=self.desired_bl,
            pulse_type=PulseType.NONE_WITH_DEVICE if self.perfect_update else PulseType.STOCHASTIC_COMPRESSED,
            update_bl_management=True, update_management=True,
        )
        backward = io()
        backward.is_perfect = self.perfect_backward
        config = SingleRPUConfig(device=device, forward=io(), backward=backward, update=update)
        return _mapped(config, self.weight_range, self.digital_bias)


@dataclass
class AihwkitPreset(AnalogPreset):
    """Any RPU config class exported by :mod:`aihwkit.simulator.presets`, by class name."""

    name: ClassVar[str] = "aihwkit:NAME"
    source: ClassVar[str] = "aihwkit.simulator.presets (see the class's docstring)"

    class_name: str = "IdealizedPreset"
    """Name of the preset class, e.g. ``IdealizedPreset`` or ``GokmenVlasovPreset``."""
    weight_range: float = WEIGHT_RANGE
    """Weight scaling as for ``rpu-baseline``: the fraction of the device's ``w_max`` that
    every array's largest weight is written at (0: the preset's own mapping)."""

    def rpu_config(self, construction_seed: int = 0) -> Any:
        from aihwkit.simulator import presets

        cls = getattr(presets, self.class_name, None)
        if not isinstance(cls, type) or not hasattr(cls, "tile_class"):
            names = sorted(n for n in dir(presets) if n.endswith("Preset"))
            raise RapaError(f"analog preset 'aihwkit:{self.class_name}' is unknown; aihwkit "
                            f"offers {', '.join(names)}")
        config = _mapped(cls(), self.weight_range)
        return _set_construction_seed(config, construction_seed) if construction_seed else config

    @property
    def pulsed(self) -> bool:
        return "FloatingPoint" not in self.class_name


@dataclass
class IdealizedPreset(AihwkitPreset):
    """aihwkit's ``IdealizedPreset`` (Rasch, Gokmen & Haensch 2019's device, arXiv 1906.02698):
    ``dw_min = 0.0002``, bounds ``+-1``, no asymmetry variation; same converters scaled to
    that range (output bound 20, noise 0.1). Close to ``rpu-baseline``, which follows the
    RAPA paper's numbers (``dw_min = 0.00025``, bounds ``+-0.6``) and keeps the bias on the array."""

    name: ClassVar[str] = "idealized"
    source: ClassVar[str] = "aihwkit.simulator.presets.IdealizedPreset (arXiv 1906.02698)"

    class_name: str = "IdealizedPreset"
    """The aihwkit preset class."""


PRESETS: dict[str, type[AnalogPreset]] = {
    IdealPreset.name: IdealPreset,
    RPUBaselinePreset.name: RPUBaselinePreset,
    IdealizedPreset.name: IdealizedPreset,
}
"""Named presets; ``aihwkit:NAME`` strings are accepted by :func:`get_preset` too."""


_SIGNED = ("up_down",)
"""Float fields of the presets that may be negative (every other one is a size, a rate or a range)."""


def preset_options(name: str, options: Sequence[str]) -> dict[str, Any]:
    """``("desired_bl=100", "out_noise=0.03")`` -> ``{"desired_bl": 100, "out_noise": 0.03}``:
    fields of the preset ``name`` (:func:`get_preset`) as ``FIELD=VALUE`` strings, each value
    parsed by its field's type (an int >= 1, a float >= 0 (``up_down`` may be negative), or a
    bool as true/false). RapaError, one line naming the option and what to give, for a
    malformed item, an unknown or repeated field, a value of the wrong type or range, or
    ``class_name`` (part of the name ``aihwkit:CLASS``)."""
    return _parse_options(name, options, by_layer=False).get("", {})


def layer_options(name: str, options: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``FIELD=VALUE`` and ``LAYER.FIELD=VALUE`` strings, grouped by layer: ``""`` for the fields
    given for every array, ``"conv1"`` for those of layer conv1's arrays only (a layer's own
    value wins over the common one). Parsed and checked as by :func:`preset_options` (same
    errors); the layer names are not checked here (the model knows its layers)."""
    return _parse_options(name, options, by_layer=True)


def _parse_options(name: str, options: Sequence[str], by_layer: bool) -> dict[str, dict[str, Any]]:
    """The one parser of :func:`preset_options` and :func:`layer_options`: layer -> field -> value
    (layer ``""`` for every array; with ``by_layer`` false a key is a field name as it is)."""
    cls = AihwkitPreset if name.startswith("aihwkit:") else PRESETS.get(name)
    if cls is None:
        get_preset(name)  # RapaError naming the unknown preset
    kinds = {f.name: f.type for f in fields(cls) if f.name != "class_name"}  # type: ignore[arg-type]
    out: dict[str, dict[str, Any]] = {}
    for item in options:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise RapaError(f"analog option {item!r}: give FIELD=VALUE, e.g. desired_bl=100")
        layer, dot, key = key.rpartition(".") if by_layer else ("", "", key)
        layer, key = layer.strip(), key.strip()
        if dot and not layer:
            raise RapaError(f"analog option {item!r}: give LAYER.FIELD=VALUE, e.g. conv1.dw_min=0.0001")
        if key not in kinds:
            raise RapaError(f"analog option {item!r}: preset {name!r} has no field {key!r}; its fields are "
                            f"{', '.join(sorted(kinds))}")
        group = out.setdefault(layer, {})
        if key in group:
            raise RapaError(f"analog option {item!r}: {key} is given twice")
        kind = str(kinds[key])
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError
                value: Any = text.lower() == "true"
            elif kind == "int":
                value = int(text)
                if value < 1:
                    raise ValueError
            else:
                value = float(text)
                if not math.isfinite(value) or (value < 0 and key not in _SIGNED):
                    raise ValueError
        except ValueError:
            what = {"bool": "true or false", "int": "an integer >= 1"}.get(
                kind, "a finite number" if key in _SIGNED else "a finite number >= 0")
            raise RapaError(f"analog option {item!r}: {key} takes {what}") from None
        group[key] = value
    return out


def presets_by_layer(name: str, options: Sequence[str]) -> tuple[AnalogPreset, dict[str, AnalogPreset]]:
    """The preset ``name`` with the common fields of ``options`` set, and one preset per layer
    that ``options`` names (``LAYER.FIELD=VALUE``, :func:`layer_options`), with the common
    fields and then the layer's own."""
    groups = layer_options(name, options)
    common = groups.pop("", {})
    return get_preset(name, **common), {layer: get_preset(name, **{**common, **own})
                                        for layer, own in groups.items()}


def get_preset(name: str | AnalogPreset, **overrides: Any) -> AnalogPreset:
    """The preset called ``name`` (``ideal``, ``rpu-baseline``, ``idealized`` or ``aihwkit:CLASS``).

    ``overrides`` set fields of the preset dataclass. An :class:`AnalogPreset` instance
    is returned as it is. Unknown names raise :class:`rapa.errors.RapaError`.
    """
    if isinstance(name, AnalogPreset):
        return name
    if not isinstance(name, str):
        raise RapaError(f"analog preset {name!r} must be a name")
    if name.startswith("aihwkit:"):
        known = {f.name for f in fields(AihwkitPreset)} - {"class_name"}  # class_name is the name's part
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"preset {name!r} has no field(s) {unknown}; it has {sorted(known)}")
        return AihwkitPreset(class_name=name.split(":", 1)[1], **overrides)
    cls = PRESETS.get(name)
    if cls is None:
        raise RapaError(f"analog preset {name!r} is unknown; choose one of "
                        f"{', '.join(PRESETS)} or aihwkit:CLASS (e.g. aihwkit:IdealizedPreset)")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"preset {name!r} has no field(s) {unknown}; it has {sorted(known)}")
    return cls(**overrides)
