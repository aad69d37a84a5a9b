#!/bin/bash
# Run 17, call 4 (H200, nothing carried; PLANNED, NOT RUN: no machine was lent for the rest of
# the session, so it is the next call's first item): one sequence's suffix step written per thread
# (`thread_step_kernel`: Mosaic GPU's lower level through `plgpu.inline_mgpu`, each warp a
# split of the keys, no wgmma; both mappings of q k^T, `key_pairs` and `dim_chunks`), each
# checked against NumPy and then timed beside call 3's steps
# (`probe_transposed_suffix.py --time`: 132 CTAs of one warpgroup, 2000 steps each, median of 5).
set -u
R=$OUT/run17; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu4.txt
export PYTHONPATH=$PWD
timeout 400 python3 experiments/probe_transposed_suffix.py --time > $R/probe4.log 2>&1
echo "rc=$?" >> $R/probe4.log
cd $OUT && tar czf run17_call4.tgz run17 && rm -rf $R
tar xzf run17_call4.tgz -O run17/probe4.log | grep -v "Deprecation\|transpose_ref" | tail -16
