#!/bin/bash
# Run 14, call 6 (H200, nothing carried): the transposed suffix steps' GPU checks that call 1's
# budget cut (16 rows a sequence: T = 4, G = 4), with the 4- and 8-row cases again, now forced
# on by config (`MosaicConfig.suffix_transposed`, off by default since call 1).
set -u
R=$OUT/run14; mkdir -p $R
timeout 200 python3 experiments/check_fused_h200.py --out $R/checks6 --budget 190 --timing-reserve 0 \
  --checks grouped_fold_transposed --shapes 4096x256 --impls "" --variants '[]' > $R/checks6.log 2>&1
echo "checks rc=$?" >> $R/checks6.log
cd $OUT && tar czf run14_call6.tgz run14 && rm -rf $R
tar xzf run14_call6.tgz -O run14/checks6.log | grep "check\|rc=\|FAIL\|rror" | tail -8
