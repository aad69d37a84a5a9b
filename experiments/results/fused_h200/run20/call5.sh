#!/bin/bash
# Run 20, call 5 (H200, nothing carried; planned in session 23, widened in session 24, not
# run): scoring an evaluation's answer choices (`engine.score`), never yet run on a GPU.
# `experiments/bench_score.py`: llama3-8b shapes with random bf16 weights, a 2,048-token
# few-shot header, questions of 64 tokens, 4 choices each; batches of 128 rows (32
# questions); hydragen (the header and each question stored once) against replicated (each
# row's prompt copied into its own cache: ~35 GB of KV a batch), each with score's two
# methods (session 24): "decode" (the choices forced through the decode loop, a step a token)
# and "prefill" (after each prompt's suffix in the prefill's pass); each variant's second
# pass timed. (1) choices of 1-4 tokens, 128 questions (512 rows, 4 batches), all four
# variants; (2) choices of 1-32 tokens, 64 questions, hydragen's two methods. (Not run as
# such: calls 7-9 ran smaller forms of both on an H100, and the prefill became score's
# default.)
# Checks on the way: every variant's log-probabilities against the first's within bf16's
# rounding, and their greedy flags.
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu5.txt
timeout 330 python3 experiments/bench_score.py --batch 128 --questions 128 --out $R/score4 \
  > $R/score4.log 2>&1
echo "rc=$?" >> $R/score4.log
timeout 220 python3 experiments/bench_score.py --batch 128 --questions 64 --choice_tokens 32 \
  --modes hydragen --out $R/score32 > $R/score32.log 2>&1
echo "rc=$?" >> $R/score32.log
cd $OUT && tar czf run20_call5.tgz run20 && rm -rf $R
for t in score4 score32; do
  echo "== $t"; tar xzf run20_call5.tgz -O run20/$t.log | grep -v "^hydrax.sharing" | tail -9
done
