#!/bin/bash
# Run 13, call 1 (H200, nothing carried): why the small-shape path kernel is slower than torch
# SDPA with the prefix copied (512/32, 1K/16). (1) Under ncu, kernel by kernel, the path
# kernel's launch settings (warps, stages, key block, programs an SM) and torch SDPA's own
# kernels, all in one process; (2) ncu's sections (speed of light, occupancy, launch, warp
# stalls, memory) for the default path kernel and torch's kernel at 1K/16; (3) device times,
# torch now from a CUDA graph of dependent calls (`peers.torch_times`), the three fastest
# settings of (1) as path variants.
set -u
R=$OUT/run13; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu.txt
pack() { (cd $OUT && tar czf run13_call1.tgz run13); }
CONFIGS='[{"path":"always"},
 {"path":"always","num_warps":2},
 {"path":"always","num_stages":3},
 {"path":"always","num_stages":4},
 {"path":"always","num_warps":1,"block_n":32,"num_stages":4},
 {"path":"always","num_warps":8,"block_n":128},
 {"path":"always","path_programs_per_sm":4},
 {"path":"always","num_warps":2,"path_programs_per_sm":4},
 {"path":"always","num_warps":2,"num_stages":3,"path_programs_per_sm":8},
 {"path":"always","num_warps":1,"block_n":32,"num_stages":4,"path_programs_per_sm":8},
 {"path":"always","block_n":32,"path_programs_per_sm":4},
 {"path":"always","block_n":32,"num_stages":4,"path_programs_per_sm":8}]'
echo "$CONFIGS" > $R/configs.json
M=gpu__time_duration.sum
tag=small_sweep
timeout 220 ncu --profile-from-start off --clock-control none --metrics $M --csv \
  --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes 1024x16,512x32 \
  --calls 3 --config "$CONFIGS" --peers torch_sdpa --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "ncu rc=$?" >> $R/prof_$tag.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes 1024x16,512x32 \
  --calls 3 --config "$CONFIGS" --peers torch_sdpa >> $R/prof_$tag.log 2>&1
rm -rf $R/prof_$tag/hlo_*config[1-9]* ; pack
tag=small_sections
timeout 100 ncu --profile-from-start off --clock-control none --section SpeedOfLight \
  --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis -k 'regex:path|flash|fmha|attention' \
  python3 experiments/profile_decode_h200.py --shapes 1024x16 --calls 1 --peers torch_sdpa \
  --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "ncu rc=$?" >> $R/prof_$tag.log
pack
# The three settings with the least serialised time at 1K/16 + 512/32 (config 0 excluded).
BEST=$(python3 - "$R/prof_small_sweep.log" "$CONFIGS" <<'PY'
import json, re, sys
text, configs = open(sys.argv[1]).read(), json.loads(sys.argv[2])
tot = {}
for c, us in re.findall(r"config (\d+): \d+ kernels, ([\d.]+) us", text):
  tot[int(c)] = tot.get(int(c), 0.0) + float(us)
best = sorted((v, c) for c, v in tot.items() if c > 0)[:3]
print(json.dumps([configs[c] for _, c in best]))
PY
)
echo "best: $BEST" > $R/best.txt
timeout 200 python3 experiments/check_fused_h200.py --out $R/small --budget 195 \
  --timing-reserve 190 --checks none --shapes 1024x16,512x32,2048x32,1024x64,4096x16 \
  --impls pallas,torch_sdpa --variants '[]' --path-variants "${BEST:-[]}" > $R/small.log 2>&1
echo "check rc=$?" >> $R/small.log
pack && rm -rf $R && cd $OUT
tar xzf run13_call1.tgz -O run13/prof_small_sweep.log 2>/dev/null | grep -v "^==" | grep "kernels\|path\|flash\|fmha\|rc=" | tail -60
tar xzf run13_call1.tgz -O run13/best.txt
tar xzf run13_call1.tgz -O run13/small.log | grep "device\|FAIL\|rc=" | tail -16
