#!/bin/bash
# Run 15, call 4 (H200, nothing carried): why the software-pipelined node steps (call 3) are
# slower. ptxas's report of the Mosaic GPU launch at 16K/256 (MOSAIC_GPU_DUMP_PTXAS: its
# registers, spills and any wgmma serialisation), the default against `node_overlap`; then
# the overlap again with the compute warpgroups at 240 registers and the memory warpgroup at
# 24 (FlashAttention-3's split; the kernel's 232 / 40 patched on this machine only).
set -u
R=$OUT/run15; mkdir -p $R
S=experiments/results/fused_h200/run15/compile_dump.py; export PYTHONPATH=$PWD
MOSAIC_GPU_DUMP_PTXAS=1 timeout 150 python3 $S '[{}, {"mosaic": {"node_overlap": true}}]' \
  > $R/ptxas.log 2>&1
echo "rc=$?" >> $R/ptxas.log
sed -i 's/set_max_registers(232, /set_max_registers(240, /; s/set_max_registers(40, /set_max_registers(24, /' \
  hydrax/attention/kernels/mosaic_gpu.py
grep -n "set_max_registers" hydrax/attention/kernels/mosaic_gpu.py >> $R/ptxas240.log
MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 $S '[{"mosaic": {"node_overlap": true}}]' \
  >> $R/ptxas240.log 2>&1
echo "rc=$?" >> $R/ptxas240.log
cd $OUT && tar czf run15_call4.tgz run15 && rm -rf $R
for f in ptxas ptxas240; do
  echo "== $f"; tar xzf run15_call4.tgz -O run15/$f.log | grep -i "config\|registers\|spill\|serializ\|Potential\|rc=\|rror\|set_max" | cut -c1-300 | head -30
done
