#!/bin/bash
# Run 15, call 3 (H200, nothing carried): the unmasked node steps software-pipelined within
# each compute warpgroup (`MosaicConfig.node_overlap`, FlashAttention-3's intra-warpgroup
# overlap: step k's q k^T issued with step k-1's p v, step k's softmax while p v runs).
# Exactness first (its checks against the XLA backend in float32), then the op's device time
# alone under ncu at the shapes: the default, the overlap, the overlap unfolded,
# cuDNN with the prefix copied, one process.
set -u
R=$OUT/run15; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
timeout 170 python3 experiments/check_fused_h200.py --out $R/checks3 --budget 160 --timing-reserve 0 \
  --checks grouped_overlap --shapes 4096x256 --impls "" --variants '[]' > $R/checks3.log 2>&1
echo "checks rc=$?" >> $R/checks3.log
SHAPES=4096x256,16384x256,32768x256,1024x256,4096x64,16384x64
CONFIGS='[{}, {"mosaic": {"node_overlap": true}}, {"mosaic": {"node_overlap": true, "fold_suffix": false}}]'
echo "$CONFIGS" > $R/configs3.json
tag=table3
timeout 330 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
rc=$?; echo "ncu rc=$rc" >> $R/prof_$tag.log
if [ $rc -eq 0 ]; then
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
    --config "$CONFIGS" --peers cudnn >> $R/prof_$tag.log 2>&1
else
  tag=cupti3
  timeout 200 python3 experiments/profile_decode_h200.py --cupti --shapes $SHAPES --calls 5 \
    --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  echo "rc=$?" >> $R/prof_$tag.log
fi
rm -rf $R/prof_*/hlo_*config[1-9]*
cd $OUT && tar czf run15_call3.tgz run15 && rm -rf $R
tar xzf run15_call3.tgz -O run15/checks3.log | grep "check\|rc=\|FAIL\|rror" | tail -12
for t in table3 cupti3; do
  tar xzf run15_call3.tgz -O run15/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror" | tail -30
done
