#!/bin/bash
# Run 18, call 4 (H200, nothing carried; session 19). Call 1 found that q read in place
# (`MosaicConfig.q_in_place`) did not lower on jax 0.11.2 (Mosaic GPU's layout inference
# asserted on a copy with an integer index between sliced axes); the kernel now sees q as
# [B*T, H*D] and out as [P, B*T, H*D]. (1) Compile and run once (ptxas's report): q in place
# folded and unfolded, the suffix warpgroup with q in place and with 3 suffix slots. (2) The
# exactness checks of q in place and of the warpgroup in place against float32 XLA. (3) The
# op's device time under Nsight Compute (one metric, clocks left alone, serialised, median of
# 3): q in place against the default, folded and unfolded, and the warpgroup at 3 slots, at
# the shapes, cuDNN with the prefix copied in the same process.
set -u
R=$OUT/run18; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu4.txt
pack() { (cd $OUT && tar czf run18_call4.tgz run18); }
export PYTHONPATH=$PWD
MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 experiments/results/fused_h200/run15/compile_dump.py \
  '[{"mosaic": {"q_in_place": true}}, {"mosaic": {"q_in_place": true, "fold_suffix": false}}, {"mosaic": {"suffix_warpgroup": true, "q_in_place": true}}, {"mosaic": {"suffix_warpgroup": true, "suffix_stages": 3}}]' \
  > $R/ptxas4.log 2>&1
echo "rc=$?" >> $R/ptxas4.log
grep -av "Potential out of bound" $R/ptxas4.log | gzip > $R/ptxas4.log.gz; rm $R/ptxas4.log; pack
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks4 --budget 140 --timing-reserve 0 \
  --checks grouped_inplace,grouped_swg_inplace --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks4.log 2>&1
echo "checks rc=$?" >> $R/checks4.log; pack
CONFIGS='[{}, {"mosaic": {"q_in_place": true}}, {"mosaic": {"fold_suffix": false}}, {"mosaic": {"fold_suffix": false, "q_in_place": true}}, {"mosaic": {"suffix_warpgroup": true, "suffix_stages": 3, "registers": [208, 32, 64]}}]'
echo "$CONFIGS" > $R/configs4.json
SH=16384x256,4096x256,32768x256,16384x64
timeout 280 ncu --profile-from-start off --clock-control none \
  --metrics gpu__time_duration.sum --csv --log-file $R/ncu_4.csv \
  python3 experiments/profile_decode_h200.py --shapes $SH --config "$CONFIGS" --peers cudnn \
  --calls 3 --out $R/prof_4 > $R/prof_4.log 2>&1
rc=$?; echo "ncu rc=$rc" >> $R/prof_4.log
[ $rc -eq 0 ] && python3 experiments/profile_decode_h200.py --parse $R/ncu_4.csv --shapes $SH \
  --config "$CONFIGS" --peers cudnn --calls 3 >> $R/prof_4.log 2>&1
rm -rf $R/prof_4*/hlo_*config[1-9]*; pack
rm -rf $R && cd $OUT
tar xzf run18_call4.tgz -O run18/ptxas4.log.gz | gunzip | grep -a "^ptxas.*spill\|^config\|^rc=\|rror" | cut -c1-200
tar xzf run18_call4.tgz -O run18/checks4.log | grep "check \|rc=" | cut -c1-200
tar xzf run18_call4.tgz -O run18/prof_4.log | grep "kernels,\|rc=\|rror\|entry_mosaic" | tail -44
