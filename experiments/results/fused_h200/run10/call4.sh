#!/bin/bash
# Run 10, call 4 (H200, nothing carried; the session's last ~400 s of device time): the
# folded suffix's mask as two compares against per-row bounds in a virtual key space (was:
# the row's group and its limit, 7 operations an element). Exactness and the profile.
set -u
R=$OUT/run10; mkdir -p $R
timeout 70 python3 experiments/check_fused_h200.py --out $R/checks4 --budget 65 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_B256,grouped_fold_tree2_bf16_gqa4_N5 --shapes 4096x256 \
  --impls "" --variants '[]' > $R/checks4.log 2>&1
echo "checks rc=$?" >> $R/checks4.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__block_size,launch__grid_size
S=16384x256,4096x256
timeout 80 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_fold4.csv python3 experiments/profile_decode_h200.py --shapes $S \
  --out $R/prof_fold4 > $R/prof_fold4.log 2>&1
echo "ncu rc=$?" >> $R/prof_fold4.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_fold4.csv --shapes $S >> $R/prof_fold4.log 2>&1
cd $OUT && tar czf run10_call4.tgz run10 && rm -rf run10
tar xzf run10_call4.tgz -O run10/checks4.log | grep "check\|rc=\|Error" | tail -5
tar xzf run10_call4.tgz -O run10/prof_fold4.log | grep -v "^==" | tail -20
