#!/bin/bash
# Run 16, call 1 (H200, nothing carried): the results README's "next call", items 1-4.
# (1) jax's version there (node_overlap is re-measured only if it changed from 0.11.2);
# (2) what a folded suffix step waits for: Nsight Compute's warp-state samples (stall reasons,
#     per SASS instruction too) of the Mosaic launch at 4K/256 and 16K/256, folded (default)
#     and unfolded (the root alone), one call each;
# (3) the small shapes in one harness: hydrax's pick, jax's cuDNN with the prefix copied and
#     torch SDPA copied, each an unrolled jitted loop of dependent calls (torch: a CUDA graph);
# (4) the engine's decode step on the GPU's timeline, cut at each loop iteration's DtoH copy.
set -u
R=$OUT/run16; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv > $R/gpu1.txt
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" >> $R/gpu1.txt 2>&1
ncu --version >> $R/gpu1.txt 2>&1
pack() { (cd $OUT && tar czf run16_call1.tgz run16); }
CONFIGS='[{}, {"mosaic": {"fold_suffix": false}}]'
for try in 1 2; do
  timeout 200 ncu --profile-from-start off --clock-control none -k regex:mosaic \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --export $R/stall --force-overwrite \
    python3 experiments/profile_decode_h200.py --shapes 4096x256,16384x256 --calls 1 \
    --config "$CONFIGS" --out $R/prof_stall > $R/prof_stall.log 2>&1
  rc=$?; echo "ncu try $try rc=$rc" >> $R/prof_stall.log
  [ -f $R/stall.ncu-rep ] && break
done
if [ -f $R/stall.ncu-rep ]; then
  ncu -i $R/stall.ncu-rep --page details --print-details all > $R/stall_details.txt 2>&1
  ncu -i $R/stall.ncu-rep --page source --print-source sass --csv > $R/stall_source.csv 2>&1
  echo "source rc=$?" >> $R/prof_stall.log
fi
rm -rf $R/prof_stall/hlo_*; pack
timeout 150 python3 experiments/check_fused_h200.py --out $R/small --budget 140 \
  --timing-reserve 135 --checks none --shapes 1024x16,512x32,4096x16 \
  --impls pallas,cudnn,torch_sdpa,pallas,cudnn --variants '[]' > $R/small.log 2>&1
echo "check rc=$?" >> $R/small.log
pack
timeout 170 python3 experiments/bench_engine.py --points 4096x256 --new-tokens 8 \
  --profile-steps 6 --backend pallas --no-dump --out $R/engine_timeline > $R/engine_timeline.log 2>&1
echo "rc=$?" >> $R/engine_timeline.log
pack && rm -rf $R && cd $OUT
tar xzf run16_call1.tgz -O run16/gpu1.txt
tar xzf run16_call1.tgz -O run16/prof_stall.log | grep "rc=\|rror" | tail -5
tar xzf run16_call1.tgz -O run16/stall_details.txt 2>/dev/null | grep -i "entry_mosaic\|Duration\|Stall\|Issue Slot\|Eligible\|No Eligible\|Registers\|Warp Cycles" | head -60
tar xzf run16_call1.tgz -O run16/small.log | grep "device\|FAIL\|rc=" | tail -16
tar xzf run16_call1.tgz -O run16/engine_timeline.log | grep -v "^\s*$" | tail -30
