#!/usr/bin/env bash
# Fashion-MNIST on simulated analog arrays (rpu-baseline) against floating point at the same
# recipe: untiled and random (16,4,1), seed 0 (SEED=N), one thread per run, no warm-up, the last epoch at
# lr/10 (the paper's step decay scaled to the budget). The analog runs
# take the analog recipe's defaults (--init lsuv, --tile-init replicate, lr 0.01 untiled, 0.02 tiled:
# `rapa train --help`);
# their FP twins are given the same init and rates explicitly. LR=X gives both twins of every
# net the rate X instead, POWER=P both twins --tile-lr-power P (a rate study).
#   bash scripts/analog-fmnist.sh short [OUT]   3 epochs on the first 10,000 training images,
#                                               2,000 test images (default OUT runs/analog)
#   bash scripts/analog-fmnist.sh full  [OUT]   5 epochs on all 60,000 / 10,000 (default OUT
#                                               runs/analog-full; about 2 hours on 2 cores)
#   bash scripts/analog-fmnist.sh long  [OUT]   8 epochs on all 60,000 / 10,000, the last two at
#                                               lr/10 (default OUT runs/analog-long; about 2 hours
#                                               per analog run on one core)
# A third argument picks the nets: none (untiled), random (16,4,1) or both (the default);
# SEED=N (default 0) sets --seed for all four runs; LR=X (default: the analog recipe's) sets
# --lr for all four; POWER=P (default 0: one rate per net) sets --tile-lr-power for all four;
# INIT=NAME (default: the analog recipe's, lsuv) sets --init for all four; TILE_INIT=independent|replicate
# (default: the analog recipe's, replicate) sets --tile-init for all four; OPTIONS=FIELD=VALUE,...
# (default none) gives the analog runs --analog-options (fields of the preset, e.g.
# OPTIONS=desired_bl=100, or of one layer's arrays, OPTIONS=conv1.dw_min=0.0001; the FP twins
# are unchanged).
# The analog runs go side by side in the background while the FP runs (short) go one after the
# other beside them. Rerunning the command resumes unfinished runs (rapa train --resume) and
# skips finished ones. Then:
#   python scripts/analog_table.py OUT          the README's table from the runs' files
set -eu
cd "$(dirname "$0")/.."
mode=${1:-short}
case "$mode" in
  short) out=${2:-runs/analog}; budget="--epochs 3 --lr-step 2 --limit-train 10000 --limit-test 2000" ;;
  full) out=${2:-runs/analog-full}; budget="--epochs 5 --lr-step 4" ;;
  long) out=${2:-runs/analog-long}; budget="--epochs 8 --lr-step 6" ;;
  *) echo "analog-fmnist.sh: mode must be short, full or long, got '$mode'" >&2; exit 2 ;;
esac
case "${3:-both}" in
  none) nets="none" ;; random) nets="random" ;; both) nets="none random" ;;
  *) echo "analog-fmnist.sh: nets must be none, random or both, got '$3'" >&2; exit 2 ;;
esac
. .venv/bin/activate
if [ -n "${OPTIONS:-}" ]; then
  python - "$OPTIONS" <<'PY' || exit 2
import sys
from rapa.config import TrainConfig
from rapa.errors import RapaError
try:
    TrainConfig(analog="rpu-baseline", analog_options=tuple(o for o in sys.argv[1].split(",") if o.strip())).validate()
except RapaError as exc:
    sys.exit(f"analog-fmnist.sh: OPTIONS: {exc}")
PY
fi
mkdir -p "$out"
read -r lr_none lr_tiled analog_init analog_tile_init < <(python -c "from rapa.config import ANALOG_LR_UNTILED as u, ANALOG_LR_TILED as t, ANALOG_INIT as i, ANALOG_TILE_INIT as ti; print(u, t, i, ti)")
seed=${SEED:-0}
case "$seed" in
  ''|*[!0-9]*) echo "analog-fmnist.sh: SEED must be a non-negative integer, got '$seed'" >&2; exit 2 ;;
esac
if [ -n "${LR:-}" ]; then
  if ! python -c "import sys; x = float(sys.argv[1]); sys.exit(not (0 < x < float('inf')))" "$LR" 2>/dev/null; then
    echo "analog-fmnist.sh: LR must be a positive number, got '$LR'" >&2; exit 2
  fi
  lr_none=$LR; lr_tiled=$LR
fi
if [ -n "${POWER:-}" ]; then
  if ! python -c "import sys; x = float(sys.argv[1]); sys.exit(not (0 <= x <= 2))" "$POWER" 2>/dev/null; then
    echo "analog-fmnist.sh: POWER must be a number from 0 to 2, got '$POWER'" >&2; exit 2
  fi
fi
init=${INIT:-$analog_init}
case "$init" in
  caffe|he|lsuv) ;;
  *) echo "analog-fmnist.sh: INIT must be caffe, he or lsuv, got '$init'" >&2; exit 2 ;;
esac
tile_init=${TILE_INIT:-$analog_tile_init}
case "$tile_init" in
  independent|replicate) ;;
  *) echo "analog-fmnist.sh: TILE_INIT must be independent or replicate, got '$tile_init'" >&2; exit 2 ;;
esac
common="--dataset fashion-mnist $budget --warmup-epochs 0 --seed $seed --threads 1 --quiet"
run() {  # backend (fp | preset) net (none | random)
  local dir="$out/fmnist-$2-$1" extra=""
  if [ "$1" = fp ]; then
    extra="--init $init --tile-init $tile_init --lr $([ "$2" = none ] && echo "$lr_none" || echo "$lr_tiled")${POWER:+ --tile-lr-power $POWER}"
  else
    extra="--analog $1 --init $init --tile-init $tile_init${LR:+ --lr $LR}${POWER:+ --tile-lr-power $POWER}${OPTIONS:+ --analog-options $OPTIONS}"
  fi
  if [ -f "$dir/summary.json" ]; then echo "$dir: finished"; return 0; fi
  if [ -f "$dir/checkpoint.pt" ]; then rapa train --resume "$dir" --threads 1 --quiet; return; fi
  if [ "$2" = none ]; then
    rapa train $common --scheme none --tiles none $extra --overwrite --out "$dir"
  else
    rapa train $common --scheme random --tiles 16,4,1 $extra --overwrite --out "$dir"
  fi
}
start=$(date +%s)
for net in $nets; do run rpu-baseline "$net" > "$out/$net-rpu.log" 2>&1 & done
for net in $nets; do run fp "$net" > "$out/$net-fp.log" 2>&1; done
wait
echo "wall time $(( $(date +%s) - start )) s" | tee "$out/wall.txt"
tail -n 4 "$out"/*.log
