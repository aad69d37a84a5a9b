#!/bin/bash
# Run 19, call 1 (H200, nothing carried; session 20): the splits' merge plane by plane
# (`flash.combine_splits` through `merge_list`) against the reductions over P it replaces
# (`flash_before.py`, the commit before), A then B in one call on one machine: the op's
# device time under Nsight Compute (one metric, clocks left alone, serialised, median of 3)
# at 16K/256, 4K/256 (2 key splits) and 16K/64 (8 splits), cuDNN with the prefix copied.
# Before the call, here (the copy is not committed; the history holds it):
#   git show 00cb2ad^:hydrax/attention/kernels/flash.py > experiments/results/fused_h200/run19/flash_before.py
set -u; R=$OUT/run19; mkdir -p $R; export PYTHONPATH=$PWD
SH=16384x256,4096x256,16384x64
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu1.txt
prof() {  # $1: label
  timeout 150 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
    --csv --log-file $R/ncu_$1.csv python3 experiments/profile_decode_h200.py --shapes $SH \
    --config "[{}]" --peers "${2:-}" --calls 3 --out $R/prof_$1 > $R/prof_$1.log 2>&1
  echo "ncu rc=$?" >> $R/prof_$1.log
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$1.csv --shapes $SH --config '[{}]' \
    ${2:+--peers $2} --calls 3 >> $R/prof_$1.log 2>&1
}
prof elementwise cudnn
cp experiments/results/fused_h200/run19/flash_before.py hydrax/attention/kernels/flash.py
prof reduce
(cd $OUT && tar czf run19_call1.tgz run19)
for l in elementwise reduce; do echo "== $l"; grep "kernels,\|rc=\|rror" $R/prof_$l.log | tail -8; done
