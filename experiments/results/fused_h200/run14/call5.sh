#!/bin/bash
# Run 14, call 5 (H200, nothing carried). Call 4: neither a barrier between the three
# projections' inputs nor XLA's --xla_gpu_dot_merger_threshold_mb=0 moved the hydragen decode
# step (10.33-10.59 ms at 4K/256 in all six runs), and the barrier's HLO still held a
# [4096,6144] array. Here the step kernel by kernel (CUPTI, 32 layers, 4K/256) with the flag,
# and its decode HLO: whether the weights' concatenate went and what the three products cost.
set -u
R=$OUT/run14; mkdir -p $R/hlo5
XLA_FLAGS="--xla_gpu_dot_merger_threshold_mb=0 --xla_dump_to=$R/hlo5 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" \
  timeout 300 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
  --profile-steps 4 --backend pallas --no-dump --out $R/engine_32_unmerged > $R/engine_32_unmerged.log 2>&1
echo "rc=$?" >> $R/engine_32_unmerged.log
for f in $(ls -S $R/hlo5/*after_optimizations.txt | head -2); do
  echo "== $(basename $f): $(grep -c 'bf16\[4096,6144\]' $f) lines with a [4096,6144] array"
  grep -n "custom_call_target=\"__cublas" $f | grep -o "bf16\[256,[0-9]*\]" | sort | uniq -c
done > $R/hlo5_lines.txt 2>&1
rm -rf $R/hlo5
cd $OUT && tar czf run14_call5.tgz run14 && rm -rf $R
tar xzf run14_call5.tgz -O run14/hlo5_lines.txt
tar xzf run14_call5.tgz -O run14/engine_32_unmerged.log | grep -A14 "hydragen, a decode step\|minus none" | tail -32
tar xzf run14_call5.tgz -O run14/engine_32_unmerged.log | grep "^| [0-9]\|rc="
