#!/bin/bash
# Run 13, call 4 (H200, nothing carried): where a decode step's attention time goes in the
# engine beyond the attention call (run 12: 92-113 us a layer in the engine's step against
# 69-76 us for the call alone in the same scan form). The engine's generation (llama3-8b
# shapes with 8 layers, random weights, 4K/256, 16 unique + 8 new tokens) without attention
# and with hydragen attention, 3 new tokens again inside a profiled region, under ncu.
set -u
R=$OUT/run13; mkdir -p $R
tag=engine_prof
timeout 330 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/bench_engine.py --points 4096x256 \
  --layers 8 --new-tokens 8 --profile-steps 3 --backend pallas --no-dump --out $R/$tag \
  > $R/$tag.log 2>&1
echo "ncu rc=$?" >> $R/$tag.log
python3 experiments/bench_engine.py --points 4096x256 --profile-steps 3 \
  --parse $R/ncu_$tag.csv >> $R/$tag.log 2>&1
cd $OUT && gzip -k $R/ncu_$tag.csv 2>/dev/null; rm -f $R/ncu_$tag.csv
tar czf run13_call4.tgz run13 && rm -rf $R
tar xzf run13_call4.tgz -O run13/$tag.log | grep -v "^==" | grep -A32 "hydragen minus none\|rc=" | head -40
