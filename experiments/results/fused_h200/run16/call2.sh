#!/bin/bash
# Run 16, call 2 (H200, nothing carried): the folded launch with node steps first
# (`MosaicConfig.suffix_lead`, default `stages`: call 1 found the first key block arriving
# after 3.2 us at 4K/256, where every CTA began on its suffixes, against 0.8 us at 16K/256)
# and the suffix mask as one compare an element against a row bound (was two and an and).
# (1) Exactness on the GPU against the XLA backend in float32 (the fold's checks, the old
# order as `_lead0`); (2) the op's device time under ncu (one process, median of 3 calls,
# kernels serialised): the default, lead 0 (the order before), lead 4, cuDNN copied;
# (3) warp-state samples of the default's launch at 4K/256.
set -u
R=$OUT/run16; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu2.txt
pack() { (cd $OUT && tar czf run16_call2.tgz run16); }
timeout 140 python3 experiments/check_fused_h200.py --out $R/checks --budget 130 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_B256_4K,grouped_fold_tree2_bf16_gqa4_N5,grouped_fold_tree2_bf16_gqa2_T2,grouped_fold_tree3,grouped_fold_transposed_tree2_bf16_gqa4_N5 \
  --shapes 4096x256 --impls "" --variants '[]' > $R/checks.log 2>&1
echo "checks rc=$?" >> $R/checks.log
pack
SHAPES=4096x256,16384x256,32768x256,1024x256,4096x64
CONFIGS='[{}, {"mosaic": {"suffix_lead": 0}}, {"mosaic": {"suffix_lead": 4}}]'
echo "$CONFIGS" > $R/configs2.json
timeout 300 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_table.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --config "$CONFIGS" --peers cudnn --out $R/prof_table > $R/prof_table.log 2>&1
echo "ncu rc=$?" >> $R/prof_table.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_table.csv --shapes $SHAPES --calls 3 \
  --config "$CONFIGS" --peers cudnn >> $R/prof_table.log 2>&1
rm -rf $R/prof_*/hlo_*config[1-9]*; pack
timeout 90 ncu --profile-from-start off --clock-control none -k regex:mosaic \
  --section WarpStateStats --section SourceCounters --export $R/stall2 --force-overwrite \
  python3 experiments/profile_decode_h200.py --shapes 4096x256 --calls 1 --out $R/prof_stall2 \
  > $R/prof_stall2.log 2>&1
echo "ncu rc=$?" >> $R/prof_stall2.log
[ -f $R/stall2.ncu-rep ] && ncu -i $R/stall2.ncu-rep --page source --print-source sass --csv \
  > $R/stall2_source.csv 2>&1
rm -rf $R/prof_stall2/hlo_*
pack && rm -rf $R && cd $OUT
tar xzf run16_call2.tgz -O run16/checks.log | grep "check\|rc=\|FAIL\|rror" | tail -12
tar xzf run16_call2.tgz -O run16/prof_table.log | grep "kernels,\|rc=\|rror\|mosaic" | tail -40
tar xzf run16_call2.tgz -O run16/prof_stall2.log | grep "rc="
