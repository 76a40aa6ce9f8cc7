"""Probe (not a feature): `rapa train` with the FC layer's array given more range.

The FC layer's weight scaling omega (aihwkit's ``weight_scaling_omega``, rapa's
``weight_range * w_max``) is multiplied by FC_OMEGA_FACTOR (default 0.5: the FC array's
largest initial weight at a quarter of the mean bound instead of half, so its logical
weights can grow to 4x their initial maximum instead of 2x; one pulse is twice as large in
logical units). Every other layer keeps rapa's mapping. Usage (from the repo root):

    python results/analog/probes/fc-range/probe.py train ARGS...   # the arguments of `rapa train`
"""
import os
import sys

import rapa.analog.convert as convert
from rapa.cli import main

FACTOR = float(os.environ.get("FC_OMEGA_FACTOR", "0.5"))
_from_digital = convert.AnalogLinear.from_digital


class _FCWithRange:
    """Stands in for aihwkit's AnalogLinear in rapa.analog.convert (only from_digital is used)."""

    @staticmethod
    def from_digital(child, rpu_config, *args, **kwargs):
        rpu_config.mapping.weight_scaling_omega *= FACTOR
        print(f"probe: FC weight_scaling_omega {rpu_config.mapping.weight_scaling_omega:.3f}", file=sys.stderr)
        return _from_digital(child, rpu_config, *args, **kwargs)


convert.AnalogLinear = _FCWithRange
sys.exit(main(sys.argv[1:]))
