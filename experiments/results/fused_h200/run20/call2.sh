#!/bin/bash
# Run 20, call 2 (H200, nothing carried; planned in session 21, not run): decode steps between
# the loop's checks (`engine.Runtime.check_every`), A B A B: 1 (each iteration copies the
# loop's condition to the host and waits for it) against 4 (an inner loop of known trip
# count, one copy every 4 steps). Run 16 found the engine's decode step 94% busy, with its
# largest gaps (177, 152 and 119 us) around those copies. The engine's decode step at
# 4K/256 (llama3-8b shapes, 32 layers): 9 new tokens (8 decode steps, a multiple of 4: no
# step past the end), the step's kernels and its timeline from 8 more steps (the timeline's
# stretches between copies are divided by check_every).
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu2.txt
run() {  # $1: label, $2: check_every
  timeout 130 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 9 \
    --check-every $2 --profile-steps 8 --backend pallas --no-dump --out $R/check_$1 \
    > $R/check_$1.log 2>&1
  echo "rc=$?" >> $R/check_$1.log
}
for rep in 1 2; do
  run A$rep 1
  run B$rep 4
done
cd $OUT && tar czf run20_call2.tgz run20 && rm -rf $R
for t in A1 B1 A2 B2; do
  echo "== $t"
  tar xzf run20_call2.tgz -O run20/check_$t.log | grep "step \|timeline\|gap\|^| 4096\|rc="
done
