#!/bin/bash
# Run 20, call 11 (planned in session 25, not run): top_p's cutoff searched against sorted
# (`engine.Runtime.nucleus`, bench_engine's --nucleus). Call 4 found the sampled decode step
# 2.7 ms (+28%) over the greedy one on an H100 at 4K/256, 2.2 ms of it cub's segmented sort
# of 256 x 128,256 logits for top_p. The search takes 8 passes over the logits, each one
# masked sum for 15 probes; if XLA fuses each pass into one reduction that reads the logits
# once (131 MB), ~45 us a pass at HBM speed, ~0.4 ms in all. A B A B (A sort, B search), the
# step's kernels from 8 more steps. (That both keep the same tokens is checked on the CPU:
# tests/test_engine.py, tests/offline/test_generate.py, tests/parallel/test_parallel.py.)
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu11.txt
run() {  # $1: label, $2: nucleus
  timeout 130 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 9 \
    --profile-steps 8 --backend pallas --no-dump --temperature 1.0 --top-p 0.95 \
    --nucleus $2 --out $R/nucleus_$1 > $R/nucleus_$1.log 2>&1
  echo "rc=$?" >> $R/nucleus_$1.log
}
for rep in 1 2; do
  run A$rep sort
  run B$rep search
done
cd $OUT && tar czf run20_call11.tgz run20 && rm -rf $R && mkdir -p /tmp/c11 \
  && tar xzf run20_call11.tgz -C /tmp/c11
grep -H "step \|timeline\|radix\|^| 4096\|rc=" /tmp/c11/run20/nucleus_{A1,B1,A2,B2}.log
