#!/bin/bash
# Run 20, call 7 (session 24; H100, on call 6's warm machine, 141 s of device time left):
# score's two methods on the GPU, small: 16 questions (64 rows, one batch of 64), hydragen.
mkdir -p $OUT/s; PYTHONPATH=$PWD timeout 125 python3 experiments/bench_score.py --batch 64 --questions 16 --modes hydragen --out $OUT/s > $OUT/s/score.log 2>&1; echo rc=$? >> $OUT/s/score.log; grep -v "^hydrax.sharing" $OUT/s/score.log | tail -8
