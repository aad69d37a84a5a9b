#!/bin/bash
# Run 14, call 2 (H200, nothing carried). Call 1 found the transposed suffix steps exact but
# slower (4K/256 launch 79.3 us against 57.1 untransposed; 32K/256 289.5 against 243.9).
# (1) Where their time goes: one step of each form timed in a loop on blocks already in
# shared memory, piece by piece (`probe_transposed_suffix.py --time`); (2) the engine's
# decode step kernel by kernel: the first item of the results README's "next call"
# (`bench_engine.py --profile-steps`: generations of 2 and 6 tokens under CUPTI, their
# difference over 4 is one decode step).
set -u
R=$OUT/run14; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu2.txt
timeout 150 python3 experiments/probe_transposed_suffix.py --time > $R/probe_time.txt 2>&1
echo "rc=$?" >> $R/probe_time.txt
timeout 330 python3 experiments/bench_engine.py --points 4096x256 --layers 8 --new-tokens 8 \
  --profile-steps 4 --backend pallas --no-dump --out $R/engine_step > $R/engine_step.log 2>&1
echo "rc=$?" >> $R/engine_step.log
cd $OUT && tar czf run14_call2.tgz run14 && rm -rf $R
tar xzf run14_call2.tgz -O run14/probe_time.txt | tail -12
tar xzf run14_call2.tgz -O run14/engine_step.log | grep -v "^\s*$" | tail -45
