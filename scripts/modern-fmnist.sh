#!/usr/bin/env bash
# Issue 17's demonstration beyond the paper: a small residual net (BatchNorm, 3 stages of one
# basic block) and a small depthwise-separable net (MobileNet-style), each untiled and
# converted with rapa.convert(net, tiles="balanced", scheme="random"), seeds 0, 1, 2, on the
# full Fashion-MNIST (60,000 / 10,000 images): SGD momentum 0.9, lr 0.05 cosine, weight decay
# 5e-4, minibatch 64, moderate augmentation, 2 epochs; test error of one pass and of a 9-vote
# majority, and the run-time model's speed-up (rapa modern --help).
#   bash scripts/modern-fmnist.sh [OUT]        about an hour on 2 free CPU cores (measured per
#                                              step: 12 runs of 4-15 minutes, two at a time)
#   bash scripts/modern-fmnist.sh tiny [OUT]   the same pipeline on 2,000 / 500 images, 1 epoch,
#                                              one seed (a few minutes): checks it end to end
# Rerunning skips finished runs (OUT/NAME/run.json); OUT/summary.md gets the table, the
# command and the wall time (default OUT results/modern, or /tmp/modern-tiny).
set -eu
cd "$(dirname "$0")/.."
. .venv/bin/activate
if [ "${1:-}" = tiny ]; then
  out=${2:-/tmp/modern-tiny}
  exec rapa modern --out "$out" --epochs 1 --seeds 0 --limit-train 2000 --limit-test 500 --jobs 2
fi
out=${1:-results/modern}
exec rapa modern --out "$out" --epochs 2 --seeds 0 1 2 --jobs 2
