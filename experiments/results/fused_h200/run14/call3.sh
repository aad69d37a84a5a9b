#!/bin/bash
# Run 14, call 3 (H200, nothing carried): what the engine's decode step does around the
# attention kernels at 4K/256 (call 2: an `input_concatenate_fusion` of 25 us a layer and a
# cuBLAS product of 26 us a layer appear only with hydragen; the step's kernels fill 2.8 of
# its 3.8 ms). (1) The same generation with XLA's dump of the decode programs' optimised HLO;
# the concatenate fusions' and cuBLAS products' lines printed. (2) The same step with all 32
# layers of llama3-8b under CUPTI: whether the gaps between kernels grow with the launches.
set -u
R=$OUT/run14; mkdir -p $R/hlo
XLA_FLAGS="--xla_dump_to=$R/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" \
  timeout 240 python3 experiments/bench_engine.py --points 4096x256 --layers 8 --new-tokens 8 \
  --backend pallas --no-dump --out $R/engine_hlo > $R/engine_hlo.log 2>&1
echo "rc=$?" >> $R/engine_hlo.log
find $R/hlo -type f ! -name "*after_optimizations.txt" -delete
for f in $(ls -S $R/hlo/*after_optimizations.txt | head -2); do
  echo "== $f"
  grep -n "input_concatenate_fusion\(_[0-9]\)\? = \|custom_call_target=\"__cublas" $f | cut -c1-400
done > $R/hlo_lines.txt 2>&1
timeout 300 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
  --profile-steps 4 --backend pallas --no-dump --out $R/engine_32 > $R/engine_32.log 2>&1
echo "rc=$?" >> $R/engine_32.log
cd $OUT && tar czf run14_call3.tgz run14 && rm -rf $R
tar xzf run14_call3.tgz -O run14/hlo_lines.txt | cut -c1-300 | head -30
tar xzf run14_call3.tgz -O run14/engine_32.log | grep "a decode step\|^|\|rc=" | tail -8
