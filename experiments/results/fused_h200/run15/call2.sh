#!/bin/bash
# Run 15, call 2 (H200, nothing carried): the engine's decode step (llama3-8b shapes, 32
# layers, random weights, 4K/256, 8 new tokens). (1) The step on the GPU's timeline (the
# results README's "next call", item 1: wall, busy, idle a step and its largest gaps),
# suffix of 16 prompt tokens (capacity 24: the suffix level on its own Triton launch);
# (2) the fold at the engine's capacities (item 2): 48 prompt tokens a sequence (capacity
# 64, one half block), the fold on (the default) against off, A B A B.
set -u
R=$OUT/run15; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu2.txt
timeout 170 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
  --profile-steps 4 --backend pallas --no-dump --out $R/engine_timeline > $R/engine_timeline.log 2>&1
echo "rc=$?" >> $R/engine_timeline.log
run() {
  timeout 80 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 --suffix 48 \
    --backend "$2" --no-dump --out $R/fold_$1 > $R/fold_$1.log 2>&1
  echo "rc=$?" >> $R/fold_$1.log
}
for rep in 1 2; do
  run A$rep pallas
  run B$rep "pallas:mosaic={'fold_suffix':False}"
done
cd $OUT && tar czf run15_call2.tgz run15 && rm -rf $R
tar xzf run15_call2.tgz -O run15/engine_timeline.log | grep -v "^\s*$" | tail -40
for t in A1 B1 A2 B2; do
  echo "$t: $(tar xzf run15_call2.tgz -O run15/fold_$t.log | grep 'step\|^| [0-9]\|rc=' | tr '\n' ' ')"
done
