#!/bin/bash
# Run 18, call 4b (H200, nothing carried; session 20): call 4's Nsight Compute table again,
# without the suffix warpgroup at 3 slots (it overflowed the CTA's shared memory by 176 bytes
# and took call 4's ncu run down with it). The op's device time (one metric, clocks left
# alone, serialised, median of 3): the default, q in place, fold off, fold off + q in place,
# at the shapes, cuDNN with the prefix copied in the same process.
set -u; R=$OUT/run18b; mkdir -p $R; export PYTHONPATH=$PWD
CONFIGS='[{}, {"mosaic": {"q_in_place": true}}, {"mosaic": {"fold_suffix": false}}, {"mosaic": {"fold_suffix": false, "q_in_place": true}}]'
echo "$CONFIGS" > $R/configs4b.json; SH=16384x256,4096x256,32768x256,16384x64
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu4b.txt
timeout 300 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_4b.csv python3 experiments/profile_decode_h200.py --shapes $SH \
  --config "$CONFIGS" --peers cudnn --calls 3 --out $R/prof_4b > $R/prof_4b.log 2>&1
rc=$?; echo "ncu rc=$rc" >> $R/prof_4b.log
[ $rc -eq 0 ] && python3 experiments/profile_decode_h200.py --parse $R/ncu_4b.csv --shapes $SH \
  --config "$CONFIGS" --peers cudnn --calls 3 >> $R/prof_4b.log 2>&1
rm -rf $R/prof_4b*/hlo_*config[1-9]*; (cd $OUT && tar czf run18_call4b.tgz run18b)
grep "kernels,\|rc=\|rror\|entry_mosaic" $R/prof_4b.log | tail -44
