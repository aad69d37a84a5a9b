#!/bin/bash
# Run 12, call 3 (H200, nothing carried): (1) the engine's decode step with the suffixes
# folded into the Mosaic launch or not (call 2: folded, 10.42-10.44 ms at 4K/256 against
# call 1's unfolded 10.28-10.45, with 16 unique tokens + 32 new), A B with 32 new tokens,
# A B with 128, A B with 32 again (suffixes of up to 48 and 143 keys). (The session's last
# ~8 minutes of device time: the float32 three-level check through prepare, ~90 s of
# compiles, left out.)
set -u
R=/tmp/run12; mkdir -p $R      # (archived into $OUT after every run: a cut call keeps its rows)
NOFOLD='pallas:mosaic={"fold_suffix": False}'
for new in 32 128 32; do
  for bk in "$NOFOLD" "pallas"; do
    tag=engine3_n${new}_$([ "$bk" = pallas ] && echo fold || echo nofold)
    i=1; while [ -e $R/$tag$i.log ]; do i=$((i+1)); done; tag=$tag$i
    timeout 55 python3 experiments/bench_engine.py --points 4096x256 --new-tokens $new \
      --backend "$bk" --no-dump --out $R/$tag > $R/$tag.log 2>&1
    echo "engine rc=$?" >> $R/$tag.log
    tar czf $OUT/run12_call3.tgz -C /tmp run12
  done
done
cd $OUT
for f in $(tar tzf run12_call3.tgz | grep "engine3.*log$" | sort); do
  echo "$f: $(tar xzf run12_call3.tgz -O $f | grep -i "hydragen:\|not folded\|rc=" | tr '\n' ' ')"; done
