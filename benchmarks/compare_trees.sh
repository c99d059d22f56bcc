#!/usr/bin/env bash
# Training and sampling throughput of two source trees, interleaved on one GPU, so that both are measured in the
# same lease (a refactor must not cost speed). Prints one JSON line per run, tagged with its tree.
# Usage: bash benchmarks/compare_trees.sh BEFORE_DIR AFTER_DIR train|sample "PRESET:PRECISION ..."
# e.g.   bash benchmarks/compare_trees.sh .before . train "edm2-img512-s:fp16 edm2-img512-s:bf16"
# WARM=1 first runs every benchmark once, all at the same time and two steps long, only to fill the compiler's
# caches (torch.compile's graphs depend on the code, not on the step count), so that the timed runs, one after
# the other, start in seconds instead of minutes; the timed figures leave the start-up out either way.
set -u
before=$1; after=$2; what=$3; runs=$4
export PYTHONUNBUFFERED=1
bench() {  # tree preset precision steps
  if [ "$what" = train ]; then
    (cd "$1" && python3 benchmarks/bench_train.py --preset "$2" --batch-gpu 64 --steps "$4" --interval $(("$4" / 3)) \
      --precision "$3" --compile 2>&1)
  else
    (cd "$1" && python3 benchmarks/bench_sample.py --preset "$2" --batch 64 --steps 32 --precision "$3" --compile \
      --repeats "$4" 2>&1)
  fi
}
if [ "${WARM:-0}" = 1 ]; then
  for run in $runs; do
    for tree in "$before" "$after"; do
      if [ "$what" = train ]; then bench "$tree" "${run%%:*}" "${run##*:}" 3 >/dev/null & else
        bench "$tree" "${run%%:*}" "${run##*:}" 1 >/dev/null & fi
    done
  done
  wait
fi
for run in $runs; do
  for tree in "$before" "$after"; do
    if [ "$what" = train ]; then n=60; else n=2; fi
    out=$(bench "$tree" "${run%%:*}" "${run##*:}" $n | grep '^{"' | tail -1)
    echo "{\"tree\": \"$tree\", \"what\": \"$what\", \"result\": ${out:-null}}"
  done
done
