#!/bin/bash
# Run 10, call 3 (H200, nothing carried): the folded suffix as the default (its table's
# scalar read a step ahead of use). (1) exactness; (2) B = 256 A B A B against the unfolded
# levels, cuDNN copied; (3) the profile; (4) the small shapes where the cost rule takes the
# path kernel (deeper key pipelines against the default, torch SDPA copied).
set -u
R=$OUT/run10; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 90 python3 experiments/check_fused_h200.py --out $R/checks3 --budget 85 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_B256,grouped_fold_tree2_bf16_gqa4_N5 --shapes 4096x256 \
  --impls "" --variants '[]' > $R/checks3.log 2>&1
echo "checks rc=$?" >> $R/checks3.log
U='{"mosaic": {"fold_suffix": false}}'
V="[$U, {\"finish\": \"once\"}, $U, {\"finish\": \"once\"}]"
timeout 120 python3 experiments/check_fused_h200.py --out $R/big3 --budget 110 --timing-reserve 108 \
  --outer 15 --checks none --shapes 4096x256,16384x256 \
  --impls pallas,cudnn --variants '[]' --pallas-variants "$V" > $R/big3.log 2>&1
echo "big rc=$?" >> $R/big3.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__block_size,launch__grid_size
S=16384x256,4096x256
timeout 70 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_fold3.csv python3 experiments/profile_decode_h200.py --shapes $S \
  --out $R/prof_fold3 > $R/prof_fold3.log 2>&1
echo "ncu rc=$?" >> $R/prof_fold3.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_fold3.csv --shapes $S >> $R/prof_fold3.log 2>&1
W='[{"narrow": [64, 4, 3]}, {"narrow": [64, 4, 4]}, {"finish": "once"}, {"narrow": [64, 4, 3]}, {"narrow": [64, 4, 4]}, {"finish": "once"}]'
timeout 120 python3 experiments/check_fused_h200.py --out $R/small3 --budget 110 --timing-reserve 108 \
  --outer 15 --checks none --shapes 1024x16,512x32 \
  --impls pallas,torch_sdpa --variants '[]' --pallas-variants "$W" > $R/small3.log 2>&1
echo "small rc=$?" >> $R/small3.log
cd $OUT && tar czf run10_call3.tgz run10 && rm -rf run10
tar xzf run10_call3.tgz -O run10/checks3.log | grep "check\|rc=\|Error" | tail -5
tar xzf run10_call3.tgz -O run10/prof_fold3.log | grep -v "^==" | tail -20
tar xzf run10_call3.tgz -O run10/big3.log | grep "variant\|rc=\|b2b\|Error" | tail -16
tar xzf run10_call3.tgz -O run10/small3.log | grep "variant\|b2b\|rc=" | tail -16
