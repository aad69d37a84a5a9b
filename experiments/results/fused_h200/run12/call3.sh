#!/bin/bash
# Run 12, call 3 (H200, nothing carried): (1) the engine's decode step with the suffixes
# folded into the Mosaic launch or not (call 2: folded, 10.42-10.44 ms at 4K/256 against
# call 1's unfolded 10.28-10.45, with 16 unique tokens + 32 new), A B A B with 32 new
# tokens, A B with 128 (suffixes of up to 48 and 143 keys); (2) exactness of the prepared calls on the
# three-level float32 tree with T = 3 (a Triton level of 5 nodes fixing the row order; ~90 s
# of compiles in run 8, so calls 1 and 2 cut it short), then the staggered fold checks.
set -u
R=$OUT/run12; mkdir -p $R
NOFOLD='pallas:mosaic={"fold_suffix": False}'
for new in 32 32 128; do
  for bk in "$NOFOLD" "pallas"; do
    tag=engine3_n${new}_$([ "$bk" = pallas ] && echo fold || echo nofold)
    i=1; while [ -e $R/$tag$i.log ]; do i=$((i+1)); done; tag=$tag$i
    timeout 60 python3 experiments/bench_engine.py --points 4096x256 --new-tokens $new \
      --backend "$bk" --no-dump --out $R/$tag > $R/$tag.log 2>&1
    echo "engine rc=$?" >> $R/$tag.log
  done
done
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks3 --budget 145 --timing-reserve 0 \
  --checks grouped_tree3_f32,grouped_fold_tree2_bf16_gqa4_N5_stagger --prepared \
  --shapes 4096x256 --impls "" --variants '[]' > $R/checks3.log 2>&1
echo "checks rc=$?" >> $R/checks3.log
cd $OUT && tar czf run12_call3.tgz run12 && rm -rf run12
for f in $(tar tzf run12_call3.tgz | grep "engine3.*log$" | sort); do
  echo "$f: $(tar xzf run12_call3.tgz -O $f | grep -i "hydragen:\|not folded\|rc=" | tr '\n' ' ')"; done
tar xzf run12_call3.tgz -O run12/checks3.log | grep "check\|rc=\|Error" | tail -6
