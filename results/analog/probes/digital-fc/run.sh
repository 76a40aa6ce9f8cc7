#!/usr/bin/env bash
# Probe: the random (16,4,1) net on rpu-baseline arrays with its FC layer kept digital,
# He init (the analog default of the time), lr 0.01, the short budget; seed $1 (1 or 2).
# Its FP twins are results/analog/short-seeds/s1, s2 (fmnist-random-fp, same recipe).
set -eu
s=${1:?seed}
out=results/analog/probes/digital-fc/s$s
rapa train --dataset fashion-mnist --epochs 3 --lr-step 2 --limit-train 10000 --limit-test 2000 \
  --warmup-epochs 0 --seed "$s" --threads 1 --quiet --scheme random --tiles 16,4,1 --init he \
  --analog rpu-baseline --digital-layers fc --overwrite --out "$out/fmnist-random-rpu-baseline-digitalfc"
