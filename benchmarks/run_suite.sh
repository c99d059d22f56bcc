#!/usr/bin/env bash
# The benchmark figures of the README, on one GPU: training and sampling for the given presets.
# Usage: bash benchmarks/run_suite.sh [presets...]   (default: edm2-img512-xs edm2-img512-s edm2-img512-m)
set -u
export PYTHONUNBUFFERED=1
presets=${*:-edm2-img512-xs edm2-img512-s edm2-img512-m}
for p in $presets; do
  for prec in fp16 bf16; do
    python3 benchmarks/bench_train.py --preset "$p" --batch-gpu 64 --steps 60 --interval 20 --precision "$prec" \
      --compile 2>&1 | grep '^{"'
    python3 benchmarks/bench_sample.py --preset "$p" --batch 64 --steps 32 --precision "$prec" --compile \
      --repeats 2 2>&1 | grep '^{"'
  done
done
