#!/bin/bash
# Run 11, call 2 (H200, nothing carried): stacked caches' layers read in the Mosaic kernel
# (the tables no longer depend on the layer), three key stages and staggered suffix steps.
# (1) exactness: the three-level fold, five nodes (two and three stages, staggered), an
# unfolded Mosaic root; (2) device time A B C D A B C D of the fold's knobs at B = 256;
# (3) the engine's form under ncu: a scan over 4 layers (are the tables computed once a
# step?); (4) the small shapes: the path kernel with one program an SM (one launch, no split
# merge) against the default and torch SDPA copied.
set -u
R=$OUT/run11; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
timeout 110 python3 experiments/check_fused_h200.py --out $R/checks2 --budget 100 --timing-reserve 0 \
  --checks grouped_fold_tree3,grouped_fold_tree2_bf16_gqa4_N5,grouped_tree3_bf16 \
  --shapes 4096x256 --impls "" --variants '[]' > $R/checks2.log 2>&1
echo "checks rc=$?" >> $R/checks2.log
F='{"finish": "once"}'
S3='{"mosaic": {"stages": 3}}'
ST='{"mosaic": {"suffix_stagger": true}}'
SS='{"mosaic": {"stages": 3, "suffix_stagger": true}}'
V="[$S3, $ST, $SS, $F, $S3, $ST, $SS, $F]"
timeout 250 python3 experiments/check_fused_h200.py --out $R/big2 --budget 240 --timing-reserve 236 \
  --outer 15 --checks none --shapes 4096x256,16384x256,32768x256 \
  --impls pallas --variants '[]' --pallas-variants "$V" > $R/big2.log 2>&1
echo "big rc=$?" >> $R/big2.log
M=gpu__time_duration.sum,launch__registers_per_thread,launch__block_size,launch__grid_size
S=4096x256,16384x256
timeout 80 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_scan.csv python3 experiments/profile_decode_h200.py --shapes $S \
  --layers 4 --out $R/prof_scan > $R/prof_scan.log 2>&1
echo "ncu rc=$?" >> $R/prof_scan.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_scan.csv --shapes $S --layers 4 \
  >> $R/prof_scan.log 2>&1
W='[{"path_programs_per_sm": 1}, {"finish": "once"}, {"path_programs_per_sm": 1}, {"finish": "once"}]'
timeout 90 python3 experiments/check_fused_h200.py --out $R/small2 --budget 85 --timing-reserve 83 \
  --outer 15 --checks none --shapes 512x32,1024x16 \
  --impls pallas,torch_sdpa --variants '[]' --pallas-variants "$W" > $R/small2.log 2>&1
echo "small rc=$?" >> $R/small2.log
cd $OUT && tar czf run11_call2.tgz run11 && rm -rf run11
tar xzf run11_call2.tgz -O run11/checks2.log | grep "check\|rc=\|Error" | tail -8
tar xzf run11_call2.tgz -O run11/prof_scan.log | grep -v "^==" | tail -32
tar xzf run11_call2.tgz -O run11/big2.log | grep "variant\|rc=\|Error" | tail -20
tar xzf run11_call2.tgz -O run11/small2.log | grep "variant\|b2b\|rc=" | tail -14
