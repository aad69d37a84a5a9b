#!/bin/bash
# Run 16, call 5 (H200, nothing carried): does the engine's q/k/v weight concatenate cost its
# 0.81 ms a step? Run 14's call 4 turned XLA's dot merger off (no concatenate, 0.67 ms less
# kernel time a step) and the step did not move; call 1 then found the step 94% busy.
# A B A B: the default (A) against --xla_gpu_dot_merger_threshold_mb=0 (B), each with the
# step on the GPU's timeline (llama3-8b shapes, 32 layers, 4K/256, 8 new tokens).
set -u
R=$OUT/run16; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu5.txt
run() {
  XLA_FLAGS="$2" timeout 110 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
    --profile-steps 6 --backend pallas --no-dump --out $R/merger_$1 > $R/merger_$1.log 2>&1
  echo "rc=$?" >> $R/merger_$1.log
}
for rep in 1 2; do
  run A$rep ""
  run B$rep "--xla_gpu_dot_merger_threshold_mb=0"
done
cd $OUT && tar czf run16_call5.tgz run16 && rm -rf $R
for t in A1 B1 A2 B2; do
  echo "== $t"
  tar xzf run16_call5.tgz -O run16/merger_$t.log | grep "step \|timeline\|concatenate\|nvjet\|^| 4096\|rc="
done
