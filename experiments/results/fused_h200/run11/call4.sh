#!/bin/bash
# Run 11, call 4 (H200, nothing carried; the session's last ~5 minutes of device time): the
# tiles' and row groups' bounds taken from the sequences' limits when rows are in place (no
# reduction of a broadcast), so that XLA can compute the tables once for all layers of a
# step. (1) the engine's form under ncu (a scan over 4 layers) at 4K/256: which kernels run
# per layer; (2) exactness of the one-node fold at 4K/256.
set -u
R=$OUT/run11; mkdir -p $R
M=gpu__time_duration.sum
timeout 75 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_scan4.csv python3 experiments/profile_decode_h200.py --shapes 4096x256 \
  --layers 4 --calls 2 --out $R/prof_scan4 > $R/prof_scan4.log 2>&1
echo "ncu rc=$?" >> $R/prof_scan4.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_scan4.csv --shapes 4096x256 \
  --layers 4 --calls 2 >> $R/prof_scan4.log 2>&1
grep -v "^==" $R/prof_scan4.log | tail -24
timeout 50 python3 experiments/check_fused_h200.py --out $R/checks4 --budget 45 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_B256_4K --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks4.log 2>&1
echo "checks rc=$?" >> $R/checks4.log
grep "check\|rc=" $R/checks4.log | tail -3
