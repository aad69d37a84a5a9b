#!/bin/bash
# Run 15, call 7 (H200, nothing carried). Call 6: with p alternating between two register
# sets ptxas no longer reported C7513 but spilled 760 bytes (C7514: spill code reading
# accumulators in flight) and the launch ran 1.7x the default. Now p goes through a
# shared-memory tile a compute warpgroup instead (stored after the p v in flight is done):
# no p held in registers across a step. ptxas's report, then the op's device time under ncu
# (default, overlap, both unfolded), then the checks.
set -u
R=$OUT/run15; mkdir -p $R
S=experiments/results/fused_h200/run15/compile_dump.py; export PYTHONPATH=$PWD
MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 $S '[{"mosaic": {"node_overlap": true}}]' \
  > $R/ptxas7.log 2>&1
echo "rc=$?" >> $R/ptxas7.log
SHAPES=16384x256,32768x256,4096x256,16384x64
CONFIGS='[{}, {"mosaic": {"node_overlap": true}}, {"mosaic": {"fold_suffix": false}}, {"mosaic": {"node_overlap": true, "fold_suffix": false}}]'
echo "$CONFIGS" > $R/configs7.json
tag=table7
timeout 240 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
rc=$?; echo "ncu rc=$rc" >> $R/prof_$tag.log
if [ $rc -eq 0 ]; then
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
    --config "$CONFIGS" --peers cudnn >> $R/prof_$tag.log 2>&1
fi
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks7 --budget 140 --timing-reserve 0 \
  --checks grouped_overlap --shapes 4096x256 --impls "" --variants '[]' > $R/checks7.log 2>&1
echo "checks rc=$?" >> $R/checks7.log
rm -rf $R/prof_*/hlo_*config[1-9]*
cd $OUT && tar czf run15_call7.tgz run15 && rm -rf $R
tar xzf run15_call7.tgz -O run15/ptxas7.log | grep -i "config\|registers\|spill\|serializ\|rc=\|rror" | cut -c1-200
tar xzf run15_call7.tgz -O run15/prof_table7.log | grep "kernels,\|rc=\|rror\|entry_mosaic" | tail -40
tar xzf run15_call7.tgz -O run15/checks7.log | grep "check\|rc=\|FAIL\|rror" | tail -8
