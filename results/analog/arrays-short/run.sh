#!/usr/bin/env bash
# short budget, analog defaults, seed 0: both RPU nets, each writing arrays.json (what its arrays did per epoch)
# run from anywhere: bash results/analog/arrays-short/run.sh   (CORE_A, CORE_B: the cores of the two runs)
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
out=results/analog/arrays-short
mkdir -p $out
c="--dataset fashion-mnist --epochs 3 --lr-step 2 --limit-train 10000 --limit-test 2000 --warmup-epochs 0 --seed 0 --threads 1 --quiet --analog rpu-baseline --overwrite"
start=$(date +%s)
taskset -c ${CORE_A:-0} rapa train $c --scheme random --tiles 16,4,1 --out $out/fmnist-random-rpu-baseline > $out/random-rpu.log 2>&1 &
taskset -c ${CORE_B:-1} rapa train $c --scheme none --tiles none --out $out/fmnist-none-rpu-baseline > $out/none-rpu.log 2>&1 &
wait
echo "wall time $(( $(date +%s) - start )) s" > $out/wall.txt
