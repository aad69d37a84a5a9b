#!/bin/bash
# Run 15, call 5 (H200, nothing carried): the PTX of the Mosaic GPU launch at 16K/256
# (MOSAIC_GPU_DUMP_PTX), the default and `node_overlap`, to find which instructions inside
# a wgmma pipeline stage made ptxas serialise the overlapped kernel's wgmma (call 4, C7513).
set -u
R=$OUT/run15; mkdir -p $R
S=experiments/results/fused_h200/run15/compile_dump.py; export PYTHONPATH=$PWD
MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 $S '[{}]' > $R/ptx_default.log 2>&1
echo "rc=$?" >> $R/ptx_default.log
MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 $S \
  '[{"mosaic": {"node_overlap": true}}]' > $R/ptx_overlap.log 2>&1
echo "rc=$?" >> $R/ptx_overlap.log
ls -la $R; gzip $R/ptx_*.log
cd $OUT && tar czf run15_call5.tgz run15 && rm -rf $R
tar xzf run15_call5.tgz -O run15/ptx_overlap.log.gz | gunzip | grep -c "wgmma" 
tar xzf run15_call5.tgz -O run15/ptx_overlap.log.gz | gunzip | grep "rc=\|C7513\|config" | cut -c1-200
