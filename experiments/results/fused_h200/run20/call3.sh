#!/bin/bash
# Run 20, call 3 (H200, nothing carried; planned in session 22, not run): the engine's decode
# loop checked on the GPU after session 22's changes, which the CPU tests cover in interpret
# mode only: the cache writes' scatters marked unique (and sorted), and `check_every`.
# `experiments/check_engine.py` (llama3-8b shapes, 2 layers, random bf16 weights, 64 prompts
# under two ~1000-token roots, 40 new tokens): per attention mode, greedy tokens with
# check_every 1 and 4 (they must be identical), scored against the model's own full forward
# pass without a cache (XLA, float32) at every generated position, with the pallas backend
# (the decode program's custom calls name the kernels that ran). Run it before calls 1 and 2:
# it checks what they time.
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
timeout 400 python3 experiments/check_engine.py --backend pallas --check-every 1,4 \
  --out $R/engine_pallas > $R/engine_pallas.log 2>&1
echo "rc=$?" >> $R/engine_pallas.log
cd $OUT && tar czf run20_call3.tgz run20 && rm -rf $R
tar xzf run20_call3.tgz -O run20/engine_pallas.log | grep "^|\|rc=\|Error\|error"
