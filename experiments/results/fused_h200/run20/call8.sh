#!/bin/bash
# Run 20, call 8 (session 24; H100, the same warm machine): (a) call 5 (1) at 64 questions
# (256 rows, batches of 128), both modes (replicated ran out of the H100's memory: its
# 128 rows' caches are 68.7 GB); (b) choices of 1-32 tokens, 32 questions, hydragen.
export PYTHONPATH=$PWD; mkdir -p $OUT/a $OUT/b; timeout 60 python3 experiments/bench_score.py --batch 128 --questions 64 --out $OUT/a > $OUT/a/score.log 2>&1; echo rc=$? >> $OUT/a/score.log; timeout 45 python3 experiments/bench_score.py --batch 128 --questions 32 --choice_tokens 32 --modes hydragen --out $OUT/b > $OUT/b/score.log 2>&1; echo rc=$? >> $OUT/b/score.log; for x in a b; do grep -v "^hydrax.sharing" $OUT/$x/score.log | tail -7; done
