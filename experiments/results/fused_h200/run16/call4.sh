#!/bin/bash
# Run 16, call 4 (H200, nothing carried): the committed default (suffixes first, the
# one-compare suffix mask) on the GPU: the fold's exactness checks against the XLA backend in
# float32, then the warp-state samples of its launch at 16K/256 (the suffix step's
# instructions against call 1's).
set -u
R=$OUT/run16; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu4.txt
pack() { (cd $OUT && tar czf run16_call4.tgz run16); }
timeout 200 python3 experiments/check_fused_h200.py --out $R/checks4 --budget 190 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_B256_4K,grouped_fold_tree3,grouped_fold_tree2_bf16_gqa2_T2,grouped_fold_tree2_bf16_gqa4_N5,grouped_fold_tree2_bf16_gqa4_B256_16K_stagger \
  --shapes 4096x256 --impls "" --variants '[]' > $R/checks4.log 2>&1
echo "checks rc=$?" >> $R/checks4.log
pack
for try in 1 2; do
  timeout 100 ncu --profile-from-start off --clock-control none -k regex:mosaic \
    --section WarpStateStats --section SourceCounters --export $R/stall4 --force-overwrite \
    python3 experiments/profile_decode_h200.py --shapes 16384x256 --calls 1 --out $R/prof_stall4 \
    > $R/prof_stall4.log 2>&1
  rc=$?; echo "ncu try $try rc=$rc" >> $R/prof_stall4.log; [ -f $R/stall4.ncu-rep ] && break
done
[ -f $R/stall4.ncu-rep ] && ncu -i $R/stall4.ncu-rep --page source --print-source sass --csv \
  > $R/stall4_source.csv 2>&1 && ncu -i $R/stall4.ncu-rep --page details --print-details all \
  > $R/stall4_details.txt 2>&1 && gzip -9 $R/stall4_source.csv $R/stall4.ncu-rep
rm -rf $R/prof_stall4/hlo_*
pack && rm -rf $R && cd $OUT
tar xzf run16_call4.tgz -O run16/checks4.log | grep "check\|rc=\|FAIL\|rror" | tail -8
tar xzf run16_call4.tgz -O run16/prof_stall4.log | grep "rc="
tar xzf run16_call4.tgz -O run16/stall4_details.txt 2>/dev/null | grep "Duration\|Warp Cycles Per Issued"
