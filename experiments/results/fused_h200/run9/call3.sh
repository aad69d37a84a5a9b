#!/bin/bash
# Run 9, call 3 (H200, nothing carried), where the cost rule takes the path (1K/16, 512/32):
# deeper key pipelines for the path kernel (`narrow`: block, warps, stages) and its groups
# of sequences against the default, A B A B in one process, and torch SDPA.
set -u
R=$OUT/run9; mkdir -p $R
W='[{"narrow": [64, 4, 3]}, {"narrow": [64, 4, 4]}, {"narrow": [32, 4, 4]}, {"path_group": 4}, {"finish": "once"}, {"narrow": [64, 4, 3]}, {"narrow": [64, 4, 4]}, {"narrow": [32, 4, 4]}, {"path_group": 4}, {"finish": "once"}]'
timeout 170 python3 experiments/check_fused_h200.py --out $R/small3 --budget 160 --timing-reserve 158 \
  --outer 15 --checks none --shapes 1024x16,512x32 \
  --impls pallas,torch_sdpa --variants '[]' --pallas-variants "$W" > $R/small3.log 2>&1
echo "small rc=$?" >> $R/small3.log
cd $OUT && tar czf run9_call3.tgz run9 && rm -rf run9
tar xzf run9_call3.tgz -O run9/small3.log | grep "variant\|torch_sdpa\|pallas  \|rc=" | tail -24
