#!/usr/bin/env bash
# Probe: the random (16,4,1) net on the full Fashion-MNIST, 5 epochs, seed 0, LSUV, base lr 0.01,
# each tiled layer's rate times nk**P (probe.py; the option --tile-lr-power did not exist yet),
# rpu-baseline and its FP twin one after the other on core $1. Usage, from the repo root:
#   bash results/analog/probes/tile-lr/run.sh CORE P TAG     # here: 0 0.5 sqrt, 1 1.0 linear
set -eu
core=$1; p=$2; tag=$3; out=results/analog/probes/tile-lr/$tag
common="--dataset fashion-mnist --epochs 5 --lr-step 4 --warmup-epochs 0 --seed 0 --threads 1 --quiet --scheme random --tiles 16,4,1 --init lsuv --lr 0.01"
s=$(date +%s)
TILE_LR_POWER=$p taskset -c $core python results/analog/probes/tile-lr/probe.py train $common --analog rpu-baseline --out $out/fmnist-random-rpu-baseline > $out/$tag-rpu.log 2>&1
echo "rpu wall $(( $(date +%s) - s )) s" >> $out/$tag-wall.txt
s=$(date +%s)
TILE_LR_POWER=$p taskset -c $core python results/analog/probes/tile-lr/probe.py train $common --out $out/fmnist-random-fp > $out/$tag-fp.log 2>&1
echo "fp wall $(( $(date +%s) - s )) s" >> $out/$tag-wall.txt
