#!/bin/bash
# Run 9, call 3 (H200, nothing carried): the path kernel's groups of sequences against one
# sequence a program (the same code, `path_group` 1), A B A B in one process, and torch SDPA,
# where the cost rule takes the path (1K/16, 512/32) and at 4K/16 forced (a longer prefix).
set -u
R=$OUT/run9; mkdir -p $R
W='[{"path_group": 4}, {"path_group": 1}, {"path_group": 4, "path": "always"}, {"path_group": 1, "path": "always"}, {"path_group": 4}, {"path_group": 1}]'
timeout 150 python3 experiments/check_fused_h200.py --out $R/small3 --budget 140 --timing-reserve 138 \
  --outer 15 --checks none --shapes 1024x16,512x32,4096x16 \
  --impls pallas,torch_sdpa --variants '[]' --pallas-variants "$W" > $R/small3.log 2>&1
echo "small rc=$?" >> $R/small3.log
cd $OUT && tar czf run9_call3.tgz run9 && rm -rf run9
tar xzf run9_call3.tgz -O run9/small3.log | grep "variant\|torch_sdpa\|pallas  \|rc=" | tail -20
