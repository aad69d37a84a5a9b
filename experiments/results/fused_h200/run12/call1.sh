#!/bin/bash
# Run 12, call 1 (H200, nothing carried): the layer-invariant tables built once per decode
# step (`hydrax.attention.prepare`, the pallas backend's `prepare_levels`) against in every
# layer. (1) exactness: the fold checks through the refactored tables (no prepare) and the
# engine's form with and without prepare against XLA (time_layers' rel_err); (2) the engine's
# form, a scan over 32 layers, A B A B, per layer, at B 256 and 64; (3) the scan of 4 layers
# under ncu at 4K/256 without and with prepare: the kernels of a layer; (4) the engine's
# decode step (llama3-8b random weights) with prepare_tables on and off.
set -u
R=$OUT/run12; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 90 python3 experiments/check_fused_h200.py --out $R/checks1 --budget 85 --timing-reserve 0 \
  --checks grouped_fold,grouped_tree3 --prepared --shapes 4096x256 --impls "" --variants '[]' \
  > $R/checks1.log 2>&1
echo "checks rc=$?" >> $R/checks1.log
timeout 160 python3 experiments/check_fused_h200.py --out $R/layers1 --budget 155 --timing-reserve 150 \
  --checks none --shapes 4096x256,16384x256,32768x256,4096x64,16384x64 --impls "" \
  --variants '[]' --layers 32 > $R/layers1.log 2>&1
echo "layers rc=$?" >> $R/layers1.log
M=gpu__time_duration.sum
for prep in "" "--prepared"; do
  tag=scan4${prep:+_prepared}
  timeout 65 ncu --profile-from-start off --clock-control none --metrics $M --csv \
    --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes 4096x256 \
    --layers 4 --calls 2 $prep --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  echo "ncu rc=$?" >> $R/prof_$tag.log
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes 4096x256 \
    --layers 4 --calls 2 >> $R/prof_$tag.log 2>&1
done
rm -rf $R/prof_scan4/hlo_* 2>/dev/null
for bk in "pallas" "pallas:prepare_tables=False"; do
  tag=engine_${bk//[:=]/_}
  timeout 75 python3 experiments/bench_engine.py --points 4096x256,16384x256 --new-tokens 32 \
    --backend "$bk" --no-dump --out $R/$tag > $R/$tag.log 2>&1
  echo "engine rc=$?" >> $R/$tag.log
done
cd $OUT && tar czf run12_call1.tgz run12 && rm -rf run12
tar xzf run12_call1.tgz -O run12/checks1.log | grep "check\|rc=\|Error" | tail -8
tar xzf run12_call1.tgz -O run12/layers1.log | grep "layer\|rc=\|FAILED" | tail -26
for tag in scan4 scan4_prepared; do tar xzf run12_call1.tgz -O run12/prof_$tag.log | grep -v "^==" | tail -14; done
for tag in engine_pallas engine_pallas_prepare_tables_False; do
  tar xzf run12_call1.tgz -O run12/$tag.log | tail -6; done
