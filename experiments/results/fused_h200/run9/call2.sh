#!/bin/bash
# Run 9, call 2 (H200, nothing carried): the path kernel with groups of sequences
# (`Config.path_group`, default: 4 sequences of G = 4 rows a program). (1) Its exactness on
# the GPU (the path_ checks), then the small shapes: the default against one sequence a
# program, the path forced, 128-key blocks, A B A B in one process, and torch SDPA. (2) Its
# per-kernel profile. (3) B = 256: 128-key blocks for the suffix kernel against the default,
# A B A B.
set -u
R=$OUT/run9; mkdir -p $R
W='[{"path_group": 1}, {"path": "always"}, {"narrow": [128, 4, 2]}, {"finish": "once"}, {"path_group": 1}, {"path": "always"}, {"narrow": [128, 4, 2]}, {"finish": "once"}]'
timeout 230 python3 experiments/check_fused_h200.py --out $R/small --budget 220 --timing-reserve 165 \
  --outer 15 --checks path_ --shapes 1024x16,512x32,1024x64,4096x16 \
  --impls pallas,torch_sdpa --variants '[]' --pallas-variants "$W" > $R/small.log 2>&1
echo "small rc=$?" >> $R/small.log
S=1024x16,512x32,1024x64,4096x16
timeout 60 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread --csv \
  --log-file $R/ncu_small.csv python3 experiments/profile_decode_h200.py --shapes $S \
  --out $R/prof_small > $R/prof_small.log 2>&1
echo "ncu rc=$?" >> $R/prof_small.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_small.csv --shapes $S >> $R/prof_small.log 2>&1
V='[{"narrow": [128, 4, 2]}, {"finish": "once"}, {"narrow": [128, 4, 2]}, {"finish": "once"}]'
timeout 100 python3 experiments/check_fused_h200.py --out $R/big --budget 90 --timing-reserve 88 \
  --outer 15 --checks none --shapes 4096x256,16384x256 \
  --impls pallas --variants '[]' --pallas-variants "$V" > $R/big.log 2>&1
echo "big rc=$?" >> $R/big.log
cd $OUT && tar czf run9_call2.tgz run9 && rm -rf run9
tar xzf run9_call2.tgz -O run9/small.log | grep "check \|variant\|torch_sdpa\|pallas  \|rc=" | tail -40
tar xzf run9_call2.tgz -O run9/prof_small.log | grep -v "^==" | tail -24
tar xzf run9_call2.tgz -O run9/big.log | grep "variant\|rc=\|pallas  " | tail -10
