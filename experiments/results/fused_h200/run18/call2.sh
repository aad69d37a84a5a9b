#!/bin/bash
# Run 18, call 2 (H200, nothing carried; PLANNED, NOT RUN when committed): the op's device
# time under Nsight Compute (one metric, clocks left alone, the call's kernels serialised,
# median of 3) with q read in place (`MosaicConfig.q_in_place`) against the default, folded
# and unfolded, at the shapes, cuDNN with the prefix copied in the same process;
# then the engine's form (a scan over 4 layers, the tables prepared once) at 4K/256 and
# 16K/256. ncu died at its start in some earlier calls: up to 2 tries each, else CUPTI.
set -u
R=$OUT/run18; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu2.txt
pack() { (cd $OUT && tar czf run18_call2.tgz run18); }
export PYTHONPATH=$PWD
CONFIGS='[{}, {"mosaic": {"q_in_place": true}}, {"mosaic": {"fold_suffix": false}}, {"mosaic": {"fold_suffix": false, "q_in_place": true}}]'
echo "$CONFIGS" > $R/configs2.json
profile() {   # tag, timeout, extra arguments
  local tag=$1 limit=$2; shift 2
  for try in 1 2; do
    timeout $limit ncu --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum --csv --log-file $R/ncu_$tag.csv \
      python3 experiments/profile_decode_h200.py "$@" --calls 3 --out $R/prof_$tag \
      > $R/prof_$tag.log 2>&1
    rc=$?; echo "ncu try $try rc=$rc" >> $R/prof_$tag.log; [ $rc -eq 0 ] && break
  done
  if [ $rc -eq 0 ]; then
    python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv "$@" --calls 3 \
      >> $R/prof_$tag.log 2>&1
  else
    timeout 150 python3 experiments/profile_decode_h200.py --cupti "$@" --calls 5 \
      --out $R/prof_${tag}_cupti > $R/prof_${tag}_cupti.log 2>&1
    echo "rc=$?" >> $R/prof_${tag}_cupti.log
  fi
  rm -rf $R/prof_$tag*/hlo_*config[1-9]*; pack
}
profile table 250 --shapes 16384x256,32768x256,4096x256,16384x64 --config "$CONFIGS" --peers cudnn
profile layers 150 --shapes 4096x256,16384x256 --layers 4 --prepared \
  --config '[{}, {"mosaic": {"q_in_place": true}}]'
rm -rf $R && cd $OUT
for t in table layers; do
  tar xzf run18_call2.tgz -O run18/prof_$t.log 2>/dev/null | grep "kernels,\|rc=\|rror\|entry_mosaic" | tail -40
  tar xzf run18_call2.tgz -O run18/prof_${t}_cupti.log 2>/dev/null | tail -30
done
