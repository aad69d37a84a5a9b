#!/bin/bash
# Run 13, call 3 (H200, nothing carried): the issue's decode table by the op's device time
# alone (ncu, kernel by kernel, one process): hydrax's default call (the cost rule), the path
# kernel forced, the grouped levels forced, the path with 4 programs an SM, and the copied-
# prefix baselines (torch SDPA, cuDNN through jax). Calls 1-2 found the jitted loop of
# dependent calls (the scripts' "device time") 1.5-2.5x the kernels' own time at the small
# shapes, whatever XLA's command-buffer flags (no command buffer formed). The first try of
# this call died at once (segfault, as run 12's small profile did: both listed 512x32 first;
# call 1, with 1024x16 first, ran): 1024x16 goes first.
set -u
R=$OUT/run13; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu3.txt
SHAPES=1024x16,512x32,1024x64,2048x32,4096x16,4096x64,16384x64,1024x256,4096x256,16384x256,32768x256
CONFIGS='[{}, {"path": "always"}, {"path": "off"}, {"path": "always", "path_programs_per_sm": 4}]'
echo "$CONFIGS" > $R/configs3.json
tag=table
timeout 450 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --config "$CONFIGS" --peers torch_sdpa,cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "ncu rc=$?" >> $R/prof_$tag.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
  --config "$CONFIGS" --peers torch_sdpa,cudnn >> $R/prof_$tag.log 2>&1
rm -rf $R/prof_$tag/hlo_*config[1-9]*
cd $OUT && tar czf run13_call3.tgz run13 && rm -rf $R
tar xzf run13_call3.tgz -O run13/prof_table.log | grep -v "^==" | grep -B1 -A0 "rc=\|Error\|error" | tail -5
python3 - <<'PY'
import re, subprocess
text = subprocess.run(["tar", "xzf", "run13_call3.tgz", "-O", "run13/prof_table.log"],
                      capture_output=True, text=True).stdout
tot = {}
for label, n, us in re.findall(r"\n(P\d+_B\d+[^:]*): (\d+) kernels, ([\d.]+) us", text):
  shape, _, rest = label.partition(" ")
  tot.setdefault(shape, {})[rest or "config 0"] = (float(us), int(n))
cols = ["config 0", "config 1", "config 2", "config 3", "torch_sdpa", "cudnn"]
print("shape | default | path | grouped | path pps4 | torch SDPA copied | cuDNN copied | best copied / default")
for shape, d in tot.items():
  cell = lambda c: f"{d[c][0]:.1f} ({d[c][1]})" if c in d else "-"
  best = min(d[c][0] for c in ("torch_sdpa", "cudnn") if c in d) if any(c in d for c in ("torch_sdpa", "cudnn")) else float("nan")
  print(shape, "|", " | ".join(cell(c) for c in cols), f"| {best / d['config 0'][0]:.2f}x" if "config 0" in d else "")
PY
