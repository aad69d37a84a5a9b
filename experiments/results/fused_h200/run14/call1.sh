#!/bin/bash
# Run 14, call 1 (H200, nothing carried): the folded suffix steps as transposed products
# (`MosaicConfig.suffix_transposed`, the keys as wgmma's M, a sequence's rows as its N = 16,
# every shared-memory tile at a 32-byte swizzle). First exactness on the GPU (the fold's checks
# against the XLA backend in float32: 4, 8 and 16 rows a sequence, the untransposed steps
# forced), then the large shapes by the op's device time alone under ncu: the new
# default against the untransposed fold, torch SDPA and cuDNN with the prefix copied, one
# process. ncu died at its start in 4 of 7 tries in run 13: on a failure the same profile
# runs again under CUPTI (`--cupti`).
set -u
R=$OUT/run14; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu1.txt
timeout 170 python3 experiments/check_fused_h200.py --out $R/checks --budget 160 --timing-reserve 0 \
  --checks grouped_fold --shapes 4096x256 --impls "" --variants '[]' > $R/checks.log 2>&1
echo "checks rc=$?" >> $R/checks.log
SHAPES=4096x256,16384x256,32768x256,1024x256,4096x64,16384x64
CONFIGS='[{}, {"mosaic": {"suffix_transposed": false}}]'
echo "$CONFIGS" > $R/configs1.json
tag=table
timeout 280 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --config "$CONFIGS" --peers torch_sdpa,cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
rc=$?; echo "ncu rc=$rc" >> $R/prof_$tag.log
if [ $rc -eq 0 ]; then
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
    --config "$CONFIGS" --peers torch_sdpa,cudnn >> $R/prof_$tag.log 2>&1
else
  tag=cupti
  timeout 200 python3 experiments/profile_decode_h200.py --cupti --shapes $SHAPES --calls 5 \
    --config "$CONFIGS" --peers torch_sdpa,cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  echo "rc=$?" >> $R/prof_$tag.log
fi
rm -rf $R/prof_*/hlo_*config[1-9]*
cd $OUT && tar czf run14_call1.tgz run14 && rm -rf $R
tar xzf run14_call1.tgz -O run14/checks.log | grep "check\|rc=\|FAIL\|rror" | tail -24
for t in table cupti; do
  tar xzf run14_call1.tgz -O run14/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror" | tail -30
done
