#!/bin/bash
# Run 20, call 9 (session 24; H100, the same warm machine, its last 73 s): call 8 (a)
# again, hydragen only.
export PYTHONPATH=$PWD; mkdir -p $OUT/c; timeout 45 python3 experiments/bench_score.py --batch 128 --questions 64 --modes hydragen --out $OUT/c > $OUT/c/score.log 2>&1; echo rc=$? >> $OUT/c/score.log; grep -v "^hydrax.sharing" $OUT/c/score.log | tail -6
