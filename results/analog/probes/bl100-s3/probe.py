"""Probe (run before `--analog-options` existed; `rapa train --analog-options desired_bl=100` does the same now): `rapa train` with rpu-baseline's fields overridden by PRESET="field=value,...". """
import dataclasses, os, sys
import rapa.analog.presets as P
from rapa.cli import main
base = P.RPUBaselinePreset
ov = {}
for kv in filter(None, os.environ.get("PRESET", "").split(",")):
    k, v = kv.split("=")
    ov[k] = type(getattr(base, k))(float(v) if isinstance(getattr(base, k), float) else v)
print("probe overrides", ov, file=sys.stderr)
@dataclasses.dataclass
class Patched(base):
    def __post_init__(self):
        for k, v in ov.items():
            setattr(self, k, v)
P.PRESETS["rpu-baseline"] = Patched
sys.exit(main(sys.argv[1:]))
