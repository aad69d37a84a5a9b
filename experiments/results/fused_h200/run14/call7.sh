#!/bin/bash
# Run 14, call 7 (H200, nothing carried; the session's last device seconds). Call 3's decode
# HLO: RoPE's cos/sin tables (two concatenate fusions) computed in every layer of the scan,
# two launches a layer, while calls 4-5 found the engine's step following its launch count.
# `llama.forward` now computes them once before the layer scan (`rope_tables`). A B A B,
# llama3-8b's 32 layers, random weights, 4K/256: A the new code, B llama.py before it
# (`llama_before_call7.py`, carried uncommitted: `git show 0df748e:hydrax/models/llama.py`).
set -u
R=$OUT/run14; mkdir -p $R
cp hydrax/models/llama.py /tmp/llama_a.py
run() {
  cp $2 hydrax/models/llama.py
  timeout 75 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
    --backend pallas --no-dump --out $R/rope_$1 > $R/rope_$1.log 2>&1
  echo "rc=$?" >> $R/rope_$1.log
}
run A1 /tmp/llama_a.py; run B1 experiments/results/fused_h200/run14/llama_before_call7.py
run A2 /tmp/llama_a.py; run B2 experiments/results/fused_h200/run14/llama_before_call7.py
cp /tmp/llama_a.py hydrax/models/llama.py
cd $OUT && tar czf run14_call7.tgz run14 && rm -rf $R
for t in A1 B1 A2 B2; do
  echo "$t: $(tar xzf run14_call7.tgz -O run14/rope_$t.log | grep '^| [0-9]\|rc=' | tr '\n' ' ')"
done
