#!/bin/bash
# Run 18, call 1 (H200, nothing carried; PLANNED, NOT RUN when committed: session 18 was lent
# no machine). (1) Run 17's call 4, never run: one sequence's suffix step written per thread
# (`thread_step_kernel`, both mappings), each checked against NumPy and then timed beside
# the wgmma steps (`probe_transposed_suffix.py --time`: 132 CTAs of one warpgroup, 2000
# steps each, median of 5). (2) q read and out written in place by the Mosaic GPU kernel
# (`MosaicConfig.q_in_place`): ptxas's report (registers, spills, wgmma serialisation) of
# the 16K/256 launch folded and unfolded, then its exactness checks against float32 XLA.
# (3) The folded suffix on a fourth warpgroup (`MosaicConfig.suffix_warpgroup`, added in
# session 19, also not run): ptxas's report of its 16K/256 launch at two register splits
# and with q in place (each compiled and run once: a hang shows as the timeout).
set -u
R=$OUT/run18; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv > $R/gpu1.txt
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" >> $R/gpu1.txt 2>&1
pack() { (cd $OUT && tar czf run18_call1.tgz run18); }
export PYTHONPATH=$PWD
timeout 150 python3 experiments/probe_transposed_suffix.py --time > $R/probe1.log 2>&1
echo "rc=$?" >> $R/probe1.log; pack
S=experiments/results/fused_h200/run15/compile_dump.py
MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 $S \
  '[{"mosaic": {"q_in_place": true}}, {"mosaic": {"q_in_place": true, "fold_suffix": false}}]' \
  > $R/ptxas1.log 2>&1
echo "rc=$?" >> $R/ptxas1.log
gzip $R/ptxas1.log; pack
MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 $S \
  '[{"mosaic": {"suffix_warpgroup": true}}, {"mosaic": {"suffix_warpgroup": true, "registers": [208, 32, 64]}}, {"mosaic": {"suffix_warpgroup": true, "q_in_place": true}}]' \
  > $R/ptxas1_swg.log 2>&1
echo "rc=$?" >> $R/ptxas1_swg.log
gzip $R/ptxas1_swg.log; pack
timeout 140 python3 experiments/check_fused_h200.py --out $R/checks1 --budget 130 --timing-reserve 0 \
  --checks grouped_inplace --shapes 4096x256 --impls "" --variants '[]' > $R/checks1.log 2>&1
echo "checks rc=$?" >> $R/checks1.log
pack && rm -rf $R && cd $OUT
tar xzf run18_call1.tgz -O run18/gpu1.txt
tar xzf run18_call1.tgz -O run18/probe1.log | grep -v "Deprecation\|transpose_ref" | tail -16
for f in ptxas1 ptxas1_swg; do
  tar xzf run18_call1.tgz -O run18/$f.log.gz | gunzip | grep -a "^ptxas\|^config\|^rc=\|spill" | cut -c1-200
done
tar xzf run18_call1.tgz -O run18/checks1.log | grep "check\|rc=\|FAIL\|rror" | tail -8
