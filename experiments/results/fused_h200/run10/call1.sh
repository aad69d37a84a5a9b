#!/bin/bash
# Run 10, call 1 (H200, nothing carried): the per-sequence level folded into the root's
# Mosaic GPU launch (`MosaicConfig.fold_suffix`). (1) exactness on the GPU against float32
# XLA (one-node root at 4K/256; five nodes with traced owners, odd batch, 3 half blocks of
# suffix; T = 2); (2) B = 256, folded against the default, A B A B, and cuDNN copied;
# (3) the per-kernel profile, folded and not.
set -u
R=$OUT/run10; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 200 python3 experiments/check_fused_h200.py --out $R/checks --budget 190 --timing-reserve 0 \
  --checks grouped_fold,grouped_tree3_bf16_gqa4 --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks.log 2>&1
echo "checks rc=$?" >> $R/checks.log
F='{"mosaic": {"fold_suffix": true}}'
V="[$F, {\"finish\": \"once\"}, $F, {\"finish\": \"once\"}]"
timeout 190 python3 experiments/check_fused_h200.py --out $R/big --budget 180 --timing-reserve 178 \
  --outer 15 --checks none --shapes 4096x256,16384x256,32768x256 \
  --impls pallas,cudnn --variants '[]' --pallas-variants "$V" > $R/big.log 2>&1
echo "big rc=$?" >> $R/big.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__block_size,launch__grid_size
S=16384x256,4096x256
for cfg in default fold; do
  C='{}'; [ $cfg = fold ] && C="$F"
  timeout 80 ncu --profile-from-start off --clock-control none --metrics $M --csv \
    --log-file $R/ncu_$cfg.csv python3 experiments/profile_decode_h200.py --shapes $S \
    --out $R/prof_$cfg --config "$C" > $R/prof_$cfg.log 2>&1
  echo "ncu $cfg rc=$?" >> $R/prof_$cfg.log
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$cfg.csv --shapes $S >> $R/prof_$cfg.log 2>&1
done
cd $OUT && tar czf run10_call1.tgz run10 && rm -rf run10
tar xzf run10_call1.tgz -O run10/checks.log | grep "check\|rc=\|Error\|error" | tail -20
tar xzf run10_call1.tgz -O run10/prof_default.log run10/prof_fold.log | grep -v "^==" | tail -40
tar xzf run10_call1.tgz -O run10/big.log | grep "variant\|rc=\|pallas  \|cudnn\|Error" | tail -30
