#!/bin/bash
# Run 20, call 5 (H200, nothing carried; planned in session 23, not run): scoring an
# evaluation's answer choices (`engine.score`, session 23), never yet run on a GPU.
# `experiments/bench_score.py`: llama3-8b shapes with random bf16 weights, a 2,048-token
# few-shot header, 256 questions of 64 tokens, 4 choices of 1-4 tokens each (1,024 rows),
# batches of 128 rows (32 questions); hydragen (the header and each question stored once, the
# choices forced through the decode loop) against replicated (each row's prompt copied into
# its own cache: ~35 GB of KV a batch), each mode's second pass timed. Checks on the way: the
# two modes' log-probabilities agree within bf16's rounding, and their greedy flags.
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu5.txt
timeout 560 python3 experiments/bench_score.py --batch 128 --out $R/score > $R/score.log 2>&1
echo "rc=$?" >> $R/score.log
cd $OUT && tar czf run20_call5.tgz run20 && rm -rf $R
tar xzf run20_call5.tgz -O run20/score.log | grep -v "^hydrax.sharing" | tail -8
