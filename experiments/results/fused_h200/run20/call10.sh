#!/bin/bash
# Run 20, call 10 (session 25; H100, on calls 1, 2, 6 and 4's warm machine, 183 s of device
# time left): score's two methods in both modes, small enough for the H100's memory (call 8
# (a)'s replicated batch of 128 rows did not fit): 32 questions (128 rows, two batches of 64).
mkdir -p $OUT/s && nvidia-smi --query-gpu=name --format=csv > $OUT/s/gpu.txt; PYTHONPATH=$PWD timeout 140 python3 experiments/bench_score.py --batch 64 --questions 32 --out $OUT/s/score > $OUT/s/score.log 2>&1; echo "rc=$?" >> $OUT/s/score.log; grep -v "^hydrax.sharing" $OUT/s/score.log | tail -12
