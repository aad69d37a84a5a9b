#!/bin/bash
# Run 20, call 3 (H200, nothing carried; planned in session 22, not run): the engine's decode
# loop checked on the GPU after session 22's changes, which the CPU tests cover in interpret
# mode only: the cache writes' scatters marked unique (and sorted), and `check_every`.
# `experiments/check_engine.py` (llama3-8b shapes, 2 layers, random bf16 weights, 64 prompts
# under two ~1000-token roots, 40 new tokens): per attention mode, greedy tokens with
# check_every 1 and 4 (they must be identical), scored against the model's own full forward
# pass without a cache (XLA, float32) at every generated position. Once with the pallas
# backend (the decode program's custom calls name the kernels that ran), once with XLA.
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
for backend in pallas xla; do
  timeout 250 python3 experiments/check_engine.py --backend $backend --check-every 1,4 \
    --out $R/engine_$backend > $R/engine_$backend.log 2>&1
  echo "rc=$?" >> $R/engine_$backend.log
done
cd $OUT && tar czf run20_call3.tgz run20 && rm -rf $R
for b in pallas xla; do
  echo "== $b"
  tar xzf run20_call3.tgz -O run20/engine_$b.log | grep "^|\|rc=\|Error\|error"
done
