#!/bin/bash
# Run 17, call 1 (H200, nothing carried): node_overlap with the first step's scores waited
# for in full. The overlapped steps' first q k^T read its scores after a wait that left one
# wgmma group in flight, its own (no p v was issued after it), so the scores were read in
# flight; ptxas serialised every wgmma for that (C7514, run 15). (1) ptxas's report of the
# overlapped launch, folded and unfolded; (2) the op's device time under ncu, the default
# against node_overlap, folded and unfolded; (3) the overlapped checks against float32 XLA.
set -u
R=$OUT/run17; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv > $R/gpu1.txt
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" >> $R/gpu1.txt 2>&1
pack() { (cd $OUT && tar czf run17_call1.tgz run17); }
export PYTHONPATH=$PWD
S=experiments/results/fused_h200/run15/compile_dump.py
MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 $S \
  '[{"mosaic": {"node_overlap": true}}, {"mosaic": {"node_overlap": true, "fold_suffix": false}}]' \
  > $R/ptxas1.log 2>&1
echo "rc=$?" >> $R/ptxas1.log
pack
SHAPES=16384x256,32768x256,4096x256,16384x64
CONFIGS='[{}, {"mosaic": {"node_overlap": true}}, {"mosaic": {"fold_suffix": false}}, {"mosaic": {"node_overlap": true, "fold_suffix": false}}]'
echo "$CONFIGS" > $R/configs1.json
tag=table
for try in 1 2 3; do
  timeout 280 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
    --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
    --calls 3 --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  rc=$?; echo "ncu try $try rc=$rc" >> $R/prof_$tag.log; [ $rc -eq 0 ] && break
done
if [ $rc -eq 0 ]; then
  python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
    --config "$CONFIGS" --peers cudnn >> $R/prof_$tag.log 2>&1
else
  tag=cupti
  timeout 200 python3 experiments/profile_decode_h200.py --cupti --shapes $SHAPES --calls 5 \
    --config "$CONFIGS" --peers cudnn --out $R/prof_$tag > $R/prof_$tag.log 2>&1
  echo "rc=$?" >> $R/prof_$tag.log
fi
rm -rf $R/prof_*/hlo_*config[1-9]*; pack
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks1 --budget 140 --timing-reserve 0 \
  --checks grouped_overlap --shapes 4096x256 --impls "" --variants '[]' > $R/checks1.log 2>&1
echo "checks rc=$?" >> $R/checks1.log
pack && rm -rf $R && cd $OUT
tar xzf run17_call1.tgz -O run17/gpu1.txt
tar xzf run17_call1.tgz -O run17/ptxas1.log | grep -i "config\|registers\|spill\|serializ\|rc=\|rror" | cut -c1-200
tar xzf run17_call1.tgz -O run17/checks1.log | grep "check\|rc=\|FAIL\|rror" | tail -8
for t in table cupti; do
  tar xzf run17_call1.tgz -O run17/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror\|entry_mosaic" | tail -40
done
