#!/bin/bash
# Run 20, call 1 (H200, nothing carried; planned in session 21, not run): the q, k and v weight
# stored as one (`llama.Attention.qkv`) against the three weights before, A B A B in one call:
# the engine's decode step kernel by kernel and on the GPU's timeline (llama3-8b shapes, 32
# layers, 4K/256, 8 new tokens), as run 16's call 5. Run 16 found XLA's dot merger joining the
# three products by concatenating their weights every layer of every step (25.3 us a layer,
# 0.81 ms of a 10.5 ms step); one stored weight should leave one product and no concatenate.
# A also marks the cache writes' indices unique and sorted (session 22): the new keys' and
# values' scatters, 7.9 us a layer in run 16, then store without atomics. Their own rows of
# the kernel table tell the two changes apart.
#
# Before the call, here: the model before the change, swapped in for B (not committed):
#   git show 6f98cfc:hydrax/models/llama.py > experiments/results/fused_h200/run20/llama_before.py
# (bench_engine builds its model with llama.init, so no checkpoint or mesh code is involved.)
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
B=experiments/results/fused_h200/run20/llama_before.py
[ -f $B ] || { echo "missing $B (see the header)"; exit 2; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu1.txt
cp hydrax/models/llama.py $R/llama_qkv.py
run() {  # $1: label
  timeout 110 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
    --profile-steps 6 --backend pallas --no-dump --out $R/engine_$1 > $R/engine_$1.log 2>&1
  echo "rc=$?" >> $R/engine_$1.log
}
for rep in 1 2; do
  cp $R/llama_qkv.py hydrax/models/llama.py; run A$rep
  cp $B hydrax/models/llama.py; run B$rep
done
cp $R/llama_qkv.py hydrax/models/llama.py
cd $OUT && tar czf run20_call1.tgz run20 && rm -rf $R
for t in A1 B1 A2 B2; do
  echo "== $t"
  tar xzf run20_call1.tgz -O run20/engine_$t.log | grep "step \|timeline\|concatenate\|scatter\|nvjet\|^| 4096\|rc="
done
