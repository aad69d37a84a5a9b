#!/bin/bash
# Run 11, call 3 (H200, nothing carried): the staggered suffix steps, fixed (call 2 hung at
# 16K/256: a staggered CTA skipped the node steps before its first suffix step, and its
# warpgroups waited for keys never loaded). (1) exactness: fold checks with and without the
# stagger (16K root included); (2) device time A B A B A B, stagger against the default, at
# B = 256; (3) the small shapes against torch SDPA copied (call 2's peer rows failed on the
# script's reference call, fixed).
set -u
R=$OUT/run11; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 130 python3 experiments/check_fused_h200.py --out $R/checks3 --budget 125 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_N5,grouped_fold_tree2_bf16_gqa4_B256 \
  --shapes 4096x256 --impls "" --variants '[]' > $R/checks3.log 2>&1
echo "checks rc=$?" >> $R/checks3.log
F='{"finish": "once"}'
ST='{"mosaic": {"suffix_stagger": true}}'
V="[$ST, $F, $ST, $F, $ST, $F]"
timeout 300 python3 experiments/check_fused_h200.py --out $R/big3 --budget 290 --timing-reserve 286 \
  --outer 15 --checks none --shapes 4096x256,16384x256,32768x256 \
  --impls pallas --variants '[]' --pallas-variants "$V" > $R/big3.log 2>&1
echo "big rc=$?" >> $R/big3.log
timeout 60 python3 experiments/check_fused_h200.py --out $R/small3 --budget 55 --timing-reserve 53 \
  --outer 15 --checks none --shapes 512x32,1024x16 \
  --impls pallas,torch_sdpa --variants '[]' > $R/small3.log 2>&1
echo "small rc=$?" >> $R/small3.log
cd $OUT && tar czf run11_call3.tgz run11 && rm -rf run11
tar xzf run11_call3.tgz -O run11/checks3.log | grep "check\|rc=\|Error" | tail -8
tar xzf run11_call3.tgz -O run11/big3.log | grep "variant\|rc=\|Error\|FAILED" | tail -14
tar xzf run11_call3.tgz -O run11/small3.log | grep "b2b\|rc=\|FAILED\|P512\|P1024" | tail -10
