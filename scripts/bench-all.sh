#!/usr/bin/env bash
# The README's benchmark tables, measured side by side on this machine (2 threads unless said):
#   bash scripts/bench-all.sh [OUT]      (default results/bench; about 15 minutes on 2 free cores)
# writes OUT/conv.txt|json (rapa bench conv, NCHW and NHWC), OUT/train-2t.txt|json and
# OUT/train-1t.txt|json (rapa bench train --profile), OUT/analog.txt|json (rapa bench analog).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/bench}
. .venv/bin/activate
mkdir -p "$out"
rapa bench conv --threads 2 --repeats 9 --json "$out/conv.json" | tee "$out/conv.txt"
rapa bench train --threads 2 --repeats 7 --profile --json "$out/train-2t.json" | tee "$out/train-2t.txt"
rapa bench train --threads 1 --repeats 7 --json "$out/train-1t.json" | tee "$out/train-1t.txt"
rapa bench analog --json "$out/analog.json" | tee "$out/analog.txt"
