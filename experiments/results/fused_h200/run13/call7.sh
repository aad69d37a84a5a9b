#!/bin/bash
# Run 13, call 7 (H200, nothing carried): call 4 (the engine's generation under ncu) died at
# its start twice (segfault); the same through torch's profiler (CUPTI:
# `bench_engine.py --profile-steps`): llama3-8b shapes with 8 layers, random weights, 4K/256,
# 16 unique + 8 new tokens, each mode's generation of 3 new tokens profiled.
set -u
R=$OUT/run13; mkdir -p $R
tag=engine_cupti
timeout 170 python3 experiments/bench_engine.py --points 4096x256 --layers 8 --new-tokens 8 \
  --profile-steps 3 --backend pallas --no-dump --out $R/$tag > $R/$tag.log 2>&1
echo "engine rc=$?" >> $R/$tag.log
cd $OUT && tar czf run13_call7.tgz run13 && rm -rf $R
tar xzf run13_call7.tgz -O run13/$tag.log | grep -A24 "hydragen minus none\|rc=" | head -30
