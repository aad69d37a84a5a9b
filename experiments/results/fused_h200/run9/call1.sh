#!/bin/bash
# Run 9, call 1 (H200, nothing carried). (1) B = 256: the grouped levels' finishes, the
# suffix tiles, and the suffix level on its own stream beside a root of fewer CTAs, each
# timed twice, interleaved in one process (A B A B). (2) Small shapes: the cost rule's pick
# against the other path and torch SDPA. (3) Per-kernel profiles with and without the merge
# in the kernel, with each kernel's registers and shared memory.
set -u
R=$OUT/run9; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
A='{"finish": "per_level", "regular_tiles": false}, {"finish": "once"}, {"merge_in_kernel": true}, {"level_stream": 1, "mosaic": {"splits": 7}}, {"level_stream": 1, "mosaic": {"splits": 6}}'
V="[$A, {\"level_stream\": 1}, {\"level_stream\": 1, \"mosaic\": {\"splits\": 4}}, {\"narrow\": [128, 4, 2]}, {\"narrow\": [64, 4, 3]}, {\"narrow\": [128, 8, 3]}, $A]"
timeout 230 python3 experiments/check_fused_h200.py --out $R/big --budget 220 --timing-reserve 218 \
  --outer 15 --checks none --shapes 4096x256,16384x256 \
  --impls pallas,cudnn --variants '[]' --pallas-variants "$V" > $R/big.log 2>&1
echo "big rc=$?" >> $R/big.log
W='[{"path": "off"}, {"path": "always"}, {"narrow": [128, 4, 2]}, {"narrow": [128, 8, 3]}, {"narrow": [64, 4, 3]}, {"finish": "once"}, {"path": "off"}, {"path": "always"}, {"narrow": [128, 4, 2]}, {"finish": "once"}]'
timeout 130 python3 experiments/check_fused_h200.py --out $R/small --budget 120 --timing-reserve 118 \
  --outer 15 --checks none --shapes 1024x16,512x32,4096x16,1024x64 \
  --impls pallas,torch_sdpa --variants '[]' --pallas-variants "$W" > $R/small.log 2>&1
echo "small rc=$?" >> $R/small.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,launch__block_size,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem
S=16384x256,4096x256,1024x16,512x32
for cfg in default merge; do
  C='{}'; [ $cfg = merge ] && C='{"merge_in_kernel": true}'
  timeout 90 ncu --profile-from-start off --clock-control none --metrics $M --csv \
    --log-file $R/ncu_$cfg.csv python3 experiments/profile_decode_h200.py --shapes $S \
    --out $R/prof_$cfg --config "$C" > $R/prof_$cfg.log 2>&1
  echo "ncu $cfg rc=$?" >> $R/prof_$cfg.log
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$cfg.csv --shapes $S >> $R/prof_$cfg.log 2>&1
done
cd $OUT && tar czf run9_call1.tgz run9 && rm -rf run9
tar xzf run9_call1.tgz -O run9/prof_default.log run9/prof_merge.log | grep -v "^==" | tail -50
tar xzf run9_call1.tgz -O run9/small.log | grep "variant\|torch_sdpa\|pallas  " | tail -30
tar xzf run9_call1.tgz -O run9/big.log | grep "variant\|rc=\|pallas  \|cudnn" | tail -40
