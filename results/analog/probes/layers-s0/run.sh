#!/usr/bin/env bash
# Which layers' arrays cost the tiled net its accuracy: random (16,4,1) on the full Fashion-MNIST,
# seed 0, the analog recipe of scripts/analog-fmnist.sh full (5 epochs, the 5th at lr/10, LSUV,
# lr 0.02, no warm-up, one thread), with some layers in floating point or one preset field
# changed. The FP twin and the all-analog run are results/analog/full-lsuv (same seed and
# recipe), the FC-digital run results/analog/probes/digital-fc-full.
#   bash results/analog/probes/layers-s0/run.sh CASE [OUT]
# CASE: dig12 (conv1, conv2 digital), dig3fc (conv3, fc digital), dig3 (conv3 digital),
# dbias (every layer analog, biases digital), pbwd (every layer analog, backward reads exact).
set -eu
cd "$(dirname "$0")/../../../.."
case "${1:-}" in
  dig12) extra="--digital-layers conv1,conv2" ;;
  dig3fc) extra="--digital-layers conv3,fc" ;;
  dig3) extra="--digital-layers conv3" ;;
  dbias) extra="--analog-options digital_bias=true" ;;
  pbwd) extra="--analog-options perfect_backward=true" ;;
  *) echo "run.sh: CASE must be dig12, dig3fc, dig3, dbias or pbwd, got '${1:-}'" >&2; exit 2 ;;
esac
out=${2:-runs/probes-layers-s0/$1}
. .venv/bin/activate
start=$(date +%s)
OPENBLAS_NUM_THREADS=1 rapa train --dataset fashion-mnist --epochs 5 --lr-step 4 --warmup-epochs 0 --seed 0 \
  --threads 1 --quiet --scheme random --tiles 16,4,1 --analog rpu-baseline $extra \
  --out "$out/fmnist-random-rpu-baseline"
echo "wall $(( $(date +%s) - start )) s"
