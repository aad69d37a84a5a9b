#!/bin/bash
# Run 17, call 3 (H200, nothing carried): what one sequence's suffix step costs on the CUDA
# cores in Mosaic GPU's warpgroup arrays (the next call's item 1: the per-sequence work off
# the wgmma warpgroups), against the wgmma steps, each alone on blocks already in shared
# memory (`probe_transposed_suffix.py --time`: 132 CTAs of one warpgroup, 2000 steps each,
# median of 5; cc_qk the 4 rows' scores alone, cc_step the whole online-softmax step).
set -u
R=$OUT/run17; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
export PYTHONPATH=$PWD
timeout 400 python3 experiments/probe_transposed_suffix.py --time > $R/probe3.log 2>&1
echo "rc=$?" >> $R/probe3.log
cd $OUT && tar czf run17_call3.tgz run17 && rm -rf $R
tar xzf run17_call3.tgz -O run17/probe3.log | tail -16
