#!/bin/bash
# Run 11, call 1 (H200, nothing carried; planned, not run): the folded suffix in its call-4
# form (two-compare mask, tile table in one pass, deeper trees). (1) exactness: every fold
# check, the three-level one first (the fold beside a Triton middle level, never run on a
# GPU); (2) device time A B A B against the unfolded levels where the root runs on the
# Mosaic kernel; (3) the profile.
set -u
R=$OUT/run11; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 170 python3 experiments/check_fused_h200.py --out $R/checks --budget 160 --timing-reserve 0 \
  --checks grouped_fold --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks.log 2>&1
echo "checks rc=$?" >> $R/checks.log
U='{"mosaic": {"fold_suffix": false}}'
V="[$U, {\"finish\": \"once\"}, $U, {\"finish\": \"once\"}]"
timeout 230 python3 experiments/check_fused_h200.py --out $R/big --budget 220 --timing-reserve 218 \
  --outer 15 --checks none --shapes 4096x256,16384x256,4096x64,16384x64,32768x256 \
  --impls pallas,cudnn --variants '[]' --pallas-variants "$V" > $R/big.log 2>&1
echo "big rc=$?" >> $R/big.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__block_size,launch__grid_size
S=16384x256,4096x256,16384x64
timeout 90 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu.csv python3 experiments/profile_decode_h200.py --shapes $S \
  --out $R/prof > $R/prof.log 2>&1
echo "ncu rc=$?" >> $R/prof.log
python3 experiments/profile_decode_h200.py --parse $R/ncu.csv --shapes $S >> $R/prof.log 2>&1
cd $OUT && tar czf run11_call1.tgz run11 && rm -rf run11
tar xzf run11_call1.tgz -O run11/checks.log | grep "check\|rc=\|Error" | tail -8
tar xzf run11_call1.tgz -O run11/prof.log | grep -v "^==" | tail -30
tar xzf run11_call1.tgz -O run11/big.log | grep "variant\|rc=\|b2b\|Error" | tail -30
