#!/usr/bin/env bash
# Fashion-MNIST, untiled and random (16,4,1), FP and rpu-baseline: 3 epochs on 10,000 training
# images (2,000 test), no warm-up, seed 0, one thread per run. The two rpu-baseline runs go
# side by side, then the two FP runs.
#   bash scripts/analog-fmnist.sh LR_UNTILED LR_TILED OUT     e.g. 0.01 0.025 runs/analog
set -eu
cd "$(dirname "$0")/.."
lr_none=${1:-0.01}; lr_random=${2:-0.025}; out=${3:-runs/analog}
. .venv/bin/activate
mkdir -p "$out"
common="--dataset fashion-mnist --epochs 3 --limit-train 10000 --limit-test 2000 --warmup-epochs 0
        --seed 0 --threads 1 --quiet --overwrite"
run() {  # backend scheme
  local analog=""; [ "$1" = fp ] || analog="--analog $1"
  if [ "$2" = none ]; then
    rapa train $common --scheme none --tiles none --lr "$lr_none" $analog --out "$out/fmnist-none-$1"
  else
    rapa train $common --scheme random --tiles 16,4,1 --lr "$lr_random" $analog --out "$out/fmnist-random-$1"
  fi
}
run rpu-baseline none > "$out/none-rpu.log" 2>&1 &
run rpu-baseline random > "$out/random-rpu.log" 2>&1 &
wait
run fp none > "$out/none-fp.log" 2>&1
run fp random > "$out/random-fp.log" 2>&1
tail -n 4 "$out"/*.log
