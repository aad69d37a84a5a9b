#!/bin/bash
# Run 12, call 2 (H200, nothing carried). Call 1's ncu profiles both ran without prepare (a
# local list in profile_decode_h200.profile shadowed its `prepared` argument; fixed), and the
# engine's suffix capacity (48: 16 unique tokens + 32 new) was not whole 64-key blocks, so
# the engine never folded the suffixes into the Mosaic launch (`engine.suffix_capacity` now
# rounds it up). (1) the scan of 4 layers under ncu at 4K/256 with prepare; (2) the small
# shapes (512/32, 1K/16: the path kernel) under ncu, kernel by kernel; (3) the engine's
# decode step with prepare_tables off and on (call 1's order reversed), the fold now on;
# (4) exactness of the prepared calls: the fold checks, then call 1's timed-out f32 tree alone.
set -u
R=$OUT/run12; mkdir -p $R
M=gpu__time_duration.sum
tag=scan4_prepared
timeout 65 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes 4096x256 \
  --layers 4 --calls 2 --prepared --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "ncu rc=$?" >> $R/prof_$tag.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes 4096x256 \
  --layers 4 --calls 2 >> $R/prof_$tag.log 2>&1
tag=small
timeout 70 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes 512x32,1024x16 \
  --calls 3 --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "ncu rc=$?" >> $R/prof_$tag.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes 512x32,1024x16 \
  --calls 3 >> $R/prof_$tag.log 2>&1
for bk in "pallas:prepare_tables=False" "pallas"; do
  tag=engine2_${bk//[:=]/_}
  timeout 75 python3 experiments/bench_engine.py --points 4096x256,16384x256 --new-tokens 32 \
    --backend "$bk" --no-dump --out $R/$tag > $R/$tag.log 2>&1
  echo "engine rc=$?" >> $R/$tag.log
done
timeout 130 python3 experiments/check_fused_h200.py --out $R/checks2 --budget 125 --timing-reserve 0 \
  --checks grouped_fold --prepared --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks2.log 2>&1
echo "checks rc=$?" >> $R/checks2.log
timeout 70 python3 experiments/check_fused_h200.py --out $R/checks2f32 --budget 65 --timing-reserve 0 \
  --checks grouped_tree3_f32 --prepared --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks2f32.log 2>&1
echo "checks rc=$?" >> $R/checks2f32.log
cd $OUT && tar czf run12_call2.tgz run12 && rm -rf run12
tar xzf run12_call2.tgz -O run12/prof_scan4_prepared.log | grep -v "^==" | tail -13
tar xzf run12_call2.tgz -O run12/prof_small.log | grep -v "^==" | tail -16
for tag in engine2_pallas_prepare_tables_False engine2_pallas; do
  tar xzf run12_call2.tgz -O run12/$tag.log | grep -i "fold\|hydragen:\|rc=" | tail -5; done
for f in checks2 checks2f32; do
  tar xzf run12_call2.tgz -O run12/$f.log | grep "check\|rc=\|Error" | tail -9; done
