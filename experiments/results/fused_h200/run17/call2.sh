#!/bin/bash
# Run 17, call 2 (H200, nothing carried): node_overlap with p in registers, the previous
# step's p fenced after the wait that ends its p v (an optimization barrier that uses it
# there), so the softmax writing the next p cannot take its registers (C7513 in run 15).
# Call 1 found C7514 gone with the first scores waited for in full, but the overlap still
# 1.11-1.13x the default's launch with p through shared memory. (1) ptxas's report and the
# PTX of the overlapped launch; (2) the op's device time under ncu, default against
# node_overlap, folded and unfolded; (3) the overlapped checks against float32 XLA.
set -u
R=$OUT/run17; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv > $R/gpu2.txt
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" >> $R/gpu2.txt 2>&1
pack() { (cd $OUT && tar czf run17_call2.tgz run17); }
export PYTHONPATH=$PWD
S=experiments/results/fused_h200/run15/compile_dump.py
MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 $S \
  '[{"mosaic": {"node_overlap": true}}, {"mosaic": {"node_overlap": true, "fold_suffix": false}}]' \
  > $R/ptxas2.log 2>&1
echo "rc=$?" >> $R/ptxas2.log
gzip $R/ptxas2.log; pack
SHAPES=16384x256,32768x256,4096x256,16384x64
CONFIGS='[{}, {"mosaic": {"node_overlap": true}}, {"mosaic": {"fold_suffix": false}}, {"mosaic": {"node_overlap": true, "fold_suffix": false}}]'
echo "$CONFIGS" > $R/configs2.json
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
timeout 150 python3 experiments/check_fused_h200.py --out $R/checks2 --budget 140 --timing-reserve 0 \
  --checks grouped_overlap --shapes 4096x256 --impls "" --variants '[]' > $R/checks2.log 2>&1
echo "checks rc=$?" >> $R/checks2.log
pack && rm -rf $R && cd $OUT
tar xzf run17_call2.tgz -O run17/gpu2.txt
tar xzf run17_call2.tgz -O run17/ptxas2.log.gz | gunzip | grep -a "^ptxas\|^config\|^rc=\|spill" | cut -c1-200
tar xzf run17_call2.tgz -O run17/checks2.log | grep "check\|rc=\|FAIL\|rror" | tail -8
for t in table cupti; do
  tar xzf run17_call2.tgz -O run17/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror\|entry_mosaic" | tail -40
done
