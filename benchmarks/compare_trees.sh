#!/usr/bin/env bash
# Training and sampling throughput of two source trees, interleaved in one process tree on one GPU, so that both
# are measured in the same lease (a refactor must not cost speed). Prints one JSON line per run, tagged "tree".
# Usage: bash benchmarks/compare_trees.sh BEFORE_DIR AFTER_DIR train|sample "PRESET:PRECISION ..."
# e.g.   bash benchmarks/compare_trees.sh .before . train "edm2-img512-s:fp16 edm2-img512-s:bf16"
set -u
before=$1; after=$2; what=$3; runs=$4
export PYTHONUNBUFFERED=1
for run in $runs; do
  preset=${run%%:*}; prec=${run##*:}
  for tree in "$before" "$after"; do
    if [ "$what" = train ]; then
      out=$(cd "$tree" && python3 benchmarks/bench_train.py --preset "$preset" --batch-gpu 64 --steps 60 \
        --interval 20 --precision "$prec" --compile 2>&1 | grep '^{"' | tail -1)
    else
      out=$(cd "$tree" && python3 benchmarks/bench_sample.py --preset "$preset" --batch 64 --steps 32 \
        --precision "$prec" --compile --repeats 2 2>&1 | grep '^{"' | tail -1)
    fi
    echo "{\"tree\": \"$tree\", \"what\": \"$what\", \"result\": ${out:-null}}"
  done
done
