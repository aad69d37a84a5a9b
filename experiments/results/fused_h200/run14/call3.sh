#!/bin/bash
# Run 14, call 3 (H200, nothing carried): what the engine's decode step does around the
# attention kernels at 4K/256 (call 2: 112.8 us a layer of attention-related kernels, of which
# the kernels of the call 53: an `input_concatenate_fusion` of 25 us a layer and a cuBLAS
# product of 26 us a layer appear only with hydragen). The same generation with XLA's dump of
# the decode programs' optimised HLO; the fusions and products of one layer printed.
set -u
R=$OUT/run14; mkdir -p $R/hlo
export XLA_FLAGS="--xla_dump_to=$R/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*"
timeout 300 python3 experiments/bench_engine.py --points 4096x256 --layers 8 --new-tokens 8 \
  --backend pallas --no-dump --out $R/engine_hlo > $R/engine_hlo.log 2>&1
echo "rc=$?" >> $R/engine_hlo.log
cd $R/hlo && ls -S | head -20 > ../hlo_files.txt
find . -name "*after_optimizations.txt" ! -name "*after_optimizations.txt" -prune -o \
  -name "*after_optimizations.txt" -print | xargs ls -S | head -4 >> ../hlo_files.txt
cd $OUT && find run14/hlo -type f ! -name "*after_optimizations.txt" -delete
tar czf run14_call3.tgz run14 && rm -rf $R
cat run14/hlo_files.txt 2>/dev/null
tar tzf run14_call3.tgz | head -20
tar xzf run14_call3.tgz -O run14/engine_hlo.log | tail -5
