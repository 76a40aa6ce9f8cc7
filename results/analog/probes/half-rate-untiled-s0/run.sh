#!/usr/bin/env bash
# The tiled net's untiled layers (conv3, FC) at half its rate: random (16,4,1) on the full
# Fashion-MNIST, seed 0, the analog recipe of scripts/analog-fmnist.sh full (5 epochs, the 5th
# at lr/10, LSUV, lr 0.02, no warm-up, one thread) with --layer-lr-scale conv3=0.5,fc=0.5 (conv1
# and conv2 at 0.02, conv3 and the FC layer at 0.01, the untiled net's rate), FP twin at the same
# rates.   bash results/analog/probes/half-rate-untiled-s0/run.sh fp|rpu [OUT]
set -eu
cd "$(dirname "$0")/../../../.."
case "${1:-}" in
  fp) extra="--init lsuv --lr 0.02"; name=fmnist-random-fp ;;
  rpu) extra="--analog rpu-baseline"; name=fmnist-random-rpu-baseline ;;
  *) echo "run.sh: give fp or rpu, got '${1:-}'" >&2; exit 2 ;;
esac
out=${2:-runs/probes-half-rate-untiled-s0}
. .venv/bin/activate
start=$(date +%s)
OPENBLAS_NUM_THREADS=1 rapa train --dataset fashion-mnist --epochs 5 --lr-step 4 --warmup-epochs 0 --seed 0 \
  --threads 1 --quiet --scheme random --tiles 16,4,1 $extra --layer-lr-scale conv3=0.5,fc=0.5 \
  --out "$out/$name"
echo "wall $(( $(date +%s) - start )) s"
