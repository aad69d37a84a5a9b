#!/bin/bash
# Run 18, call 3 (H200, nothing carried; PLANNED, NOT RUN when committed: added in session
# 19, which was lent no machine either). The folded suffix on a fourth warpgroup, per thread
# (`MosaicConfig.suffix_warpgroup`): (1) its exactness checks against float32 XLA
# (`check_fused_h200.py --checks grouped_swg`: 16K/256, 4K/256 with q in place, five nodes
# with traced owners, T = 2, G = 8 in place, G = 1); (2) the op's device time under Nsight
# Compute as in call 2 (one metric, clocks left alone, serialised, median of 3), the
# warpgroup at two register splits against the default fold and the unfolded launch (the
# bound the warpgroup aims at), cuDNN with the prefix copied in the same process. (q in
# place is left out: call 1 found it does not lower on jax 0.11.2.) Run it after call 1 shows the launch compiles and
# runs (its ptxas1_swg.log).
set -u
R=$OUT/run18; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
pack() { (cd $OUT && tar czf run18_call3.tgz run18); }
export PYTHONPATH=$PWD
timeout 200 python3 experiments/check_fused_h200.py --out $R/checks3 --budget 190 --timing-reserve 0 \
  --checks grouped_swg_fold --shapes 4096x256 --impls "" --variants '[]' > $R/checks3.log 2>&1
echo "checks rc=$?" >> $R/checks3.log; pack
CONFIGS='[{}, {"mosaic": {"suffix_warpgroup": true}}, {"mosaic": {"suffix_warpgroup": true, "registers": [208, 32, 64]}}, {"mosaic": {"fold_suffix": false}}]'
echo "$CONFIGS" > $R/configs3.json
for try in 1 2; do
  timeout 300 ncu --profile-from-start off --clock-control none \
    --metrics gpu__time_duration.sum --csv --log-file $R/ncu_swg.csv \
    python3 experiments/profile_decode_h200.py --shapes 16384x256,4096x256,32768x256,16384x64 \
    --config "$CONFIGS" --peers cudnn --calls 3 --out $R/prof_swg > $R/prof_swg.log 2>&1
  rc=$?; echo "ncu try $try rc=$rc" >> $R/prof_swg.log; [ $rc -eq 0 ] && break
done
[ $rc -eq 0 ] && python3 experiments/profile_decode_h200.py --parse $R/ncu_swg.csv \
  --shapes 16384x256,4096x256,32768x256,16384x64 --config "$CONFIGS" --peers cudnn --calls 3 \
  >> $R/prof_swg.log 2>&1
rm -rf $R/prof_swg*/hlo_*config[1-9]*; pack
rm -rf $R && cd $OUT
tar xzf run18_call3.tgz -O run18/checks3.log | grep "check\|rc=\|FAIL\|rror" | tail -8
tar xzf run18_call3.tgz -O run18/prof_swg.log | grep "kernels,\|rc=\|rror\|entry_mosaic" | tail -40
