#!/bin/bash
# Run 15, call 1 (H200, nothing carried): the folded suffix steps out of the compute
# warpgroups' ping-pong (`MosaicConfig.suffix_pingpong` off). Run 10 found the fold adds
# ~26-28 us to the root's launch at 4K/256 and 16K/256 alike (16 suffix steps a CTA, ~1.7 us
# each, as long as a node step though half its products); a suffix step alone takes 0.79 us
# (run 14): the ping-pong serialises the two warpgroups' latency-bound suffix steps.
# First exactness on the GPU (the free steps' checks against the XLA backend in float32),
# then the shapes by the op's device time alone under ncu: the default, the free
# suffix steps, the levels unfolded (the root's launch alone), cuDNN with the prefix copied.
set -u
R=$OUT/run15; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu1.txt
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks --budget 140 --timing-reserve 0 \
  --checks grouped_fold_free --shapes 4096x256 --impls "" --variants '[]' > $R/checks.log 2>&1
echo "checks rc=$?" >> $R/checks.log
SHAPES=4096x256,16384x256,32768x256,1024x256,4096x64,16384x64
CONFIGS='[{}, {"mosaic": {"suffix_pingpong": false}}, {"mosaic": {"fold_suffix": false}}]'
echo "$CONFIGS" > $R/configs1.json
tag=table
timeout 330 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
rc=$?; echo "ncu rc=$rc" >> $R/prof_$tag.log
if [ $rc -eq 0 ]; then
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
    --config "$CONFIGS" --peers cudnn >> $R/prof_$tag.log 2>&1
else
  tag=cupti
  timeout 200 python3 experiments/profile_decode_h200.py --cupti --shapes $SHAPES --calls 5 \
    --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  echo "rc=$?" >> $R/prof_$tag.log
fi
rm -rf $R/prof_*/hlo_*config[1-9]*
cd $OUT && tar czf run15_call1.tgz run15 && rm -rf $R
tar xzf run15_call1.tgz -O run15/checks.log | grep "check\|rc=\|FAIL\|rror" | tail -12
for t in table cupti; do
  tar xzf run15_call1.tgz -O run15/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror" | tail -30
done
