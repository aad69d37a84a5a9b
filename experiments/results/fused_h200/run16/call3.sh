#!/bin/bash
# Run 16, call 3 (H200, the same machine as call 2, nothing carried): call 2's table again,
# since ncu died at its start there (segfault, as in 4 of 7 starts in run 13): up to three
# starts, then CUPTI instead; then the two exactness checks call 2's timeout cut.
set -u
R=$OUT/run16; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
pack() { (cd $OUT && tar czf run16_call3.tgz run16); }
SHAPES=4096x256,16384x256,32768x256,1024x256,4096x64
CONFIGS='[{}, {"mosaic": {"suffix_lead": 0}}, {"mosaic": {"suffix_lead": 4}}]'
echo "$CONFIGS" > $R/configs3.json
tag=table
for try in 1 2 3; do
  timeout 300 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
    --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
    --calls 3 --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  rc=$?; echo "ncu try $try rc=$rc" >> $R/prof_$tag.log; [ $rc -eq 0 ] && break
done
if [ $rc -eq 0 ]; then
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
    --config "$CONFIGS" --peers cudnn >> $R/prof_$tag.log 2>&1
else
  tag=cupti
  timeout 200 python3 experiments/profile_decode_h200.py --cupti --shapes $SHAPES --calls 5 \
    --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  echo "rc=$?" >> $R/prof_$tag.log
fi
rm -rf $R/prof_*/hlo_*config[1-9]*; pack
timeout 100 python3 experiments/check_fused_h200.py --out $R/checks3 --budget 90 --timing-reserve 0 \
  --checks grouped_fold_tree2_bf16_gqa4_N5_lead0,grouped_fold_transposed_tree2_bf16_gqa4_N5 \
  --shapes 4096x256 --impls "" --variants '[]' > $R/checks3.log 2>&1
echo "checks rc=$?" >> $R/checks3.log
pack && rm -rf $R && cd $OUT
tar xzf run16_call3.tgz -O run16/checks3.log | grep "check\|rc=\|FAIL\|rror" | tail -6
for t in table cupti; do
  tar xzf run16_call3.tgz -O run16/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror\|mosaic" | tail -40
done
