#!/bin/bash
# Run 10, call 2 (H200, nothing carried): the folded suffix's steps spread among the root's
# (interleaved, so that the suffixes' HBM reads overlap the root's matrix products).
# (1) exactness against float32 XLA; (2) B = 256 A B A B against the default, with cuDNN
# copied; (3) other shapes where the root runs on the Mosaic kernel; (4) the profile.
set -u
R=$OUT/run10; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks2 --budget 140 --timing-reserve 0 \
  --checks grouped_fold --shapes 4096x256 --impls "" --variants '[]' > $R/checks2.log 2>&1
echo "checks rc=$?" >> $R/checks2.log
F='{"mosaic": {"fold_suffix": true}}'
V="[$F, {\"finish\": \"once\"}, $F, {\"finish\": \"once\"}]"
timeout 170 python3 experiments/check_fused_h200.py --out $R/big2 --budget 160 --timing-reserve 158 \
  --outer 15 --checks none --shapes 4096x256,16384x256,32768x256 \
  --impls pallas,cudnn --variants '[]' --pallas-variants "$V" > $R/big2.log 2>&1
echo "big rc=$?" >> $R/big2.log
timeout 120 python3 experiments/check_fused_h200.py --out $R/mid2 --budget 110 --timing-reserve 108 \
  --outer 9 --checks none --shapes 4096x64,16384x64,1024x256,4096x1024 \
  --impls pallas --variants '[]' --pallas-variants "[$F]" > $R/mid2.log 2>&1
echo "mid rc=$?" >> $R/mid2.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__block_size,launch__grid_size
S=16384x256,4096x256
timeout 80 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_fold2.csv python3 experiments/profile_decode_h200.py --shapes $S \
  --out $R/prof_fold2 --config "$F" > $R/prof_fold2.log 2>&1
echo "ncu rc=$?" >> $R/prof_fold2.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_fold2.csv --shapes $S >> $R/prof_fold2.log 2>&1
cd $OUT && tar czf run10_call2.tgz run10 && rm -rf run10
tar xzf run10_call2.tgz -O run10/checks2.log | grep "check\|rc=\|Error" | tail -8
tar xzf run10_call2.tgz -O run10/prof_fold2.log | grep -v "^==" | tail -22
tar xzf run10_call2.tgz -O run10/big2.log | grep "variant\|rc=\|pallas  \|cudnn  \|Error" | tail -16
tar xzf run10_call2.tgz -O run10/mid2.log | grep "b2b\|rc=\|Error" | tail -12
