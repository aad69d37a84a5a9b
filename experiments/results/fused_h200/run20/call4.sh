#!/bin/bash
# Run 20, call 4 (H200, nothing carried; planned in session 23, not run): what sampling and
# log-probabilities cost in the engine's decode step. Session 23 gave every row its own PRNG
# keys (`engine.row_keys`: a row's draw depends on its seed and position only; the same B x V
# random bits as one key gave, now drawn per row under vmap) and added `logprobs=True` (one
# log-sum-exp over the vocabulary a step). Neither is timed anywhere yet. The engine's decode
# step at 4K/256 (llama3-8b shapes, 32 layers), A B C B (four runs fit the 600 s a call may
# take): greedy, sampled (temperature 1, top_p 0.95: the sort of top_p included), greedy with
# log-probabilities; 9 new tokens, the step's kernels from 8 more steps (per-kernel device
# times, which vary less between runs than the timeline's wall; B twice for the new path).
# Expected: the sampled step adds the sort and the random bits of 256 x 128,256 logits; the
# log-probabilities one read of them (~30 us at 4.3 TB/s).
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu4.txt
run() {  # $1: label, then bench_engine's sampling flags
  local label=$1; shift
  timeout 140 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 9 \
    --profile-steps 8 --backend pallas --no-dump --out $R/sample_$label "$@" \
    > $R/sample_$label.log 2>&1
  echo "rc=$?" >> $R/sample_$label.log
}
run A1
run B1 --temperature 1.0 --top-p 0.95
run C1 --logprobs
run B2 --temperature 1.0 --top-p 0.95
cd $OUT && tar czf run20_call4.tgz run20 && rm -rf $R
for t in A1 B1 C1 B2; do
  echo "== $t"
  tar xzf run20_call4.tgz -O run20/sample_$t.log | grep "step \|timeline\|^| 4096\|rc="
done
