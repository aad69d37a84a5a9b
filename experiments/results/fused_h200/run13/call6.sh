#!/bin/bash
# Run 13, call 6 (H200, `.peer` carried): call 5 again without ncu, which died at its start
# (segfault; 4 of 7 ncu starts this run): each call's kernels through torch's profiler
# (CUPTI, `profile_decode_h200.py --cupti`), hydrax's default, FlashInfer's cascade and torch
# SDPA with the prefix copied (against call 3's ncu figures for the same two) in one process.
set -u
R=$OUT/run13; mkdir -p $R
bash experiments/install_peers.sh .peer > $R/install6.log 2>&1; echo "install rc=$?" >> $R/install6.log
export PYTHONPATH=/tmp/site
SHAPES=1024x16,512x32,4096x64,4096x256,16384x256,32768x256
tag=cupti
timeout 330 python3 experiments/profile_decode_h200.py --cupti --shapes $SHAPES --calls 5 \
  --peers flashinfer,torch_sdpa --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "rc=$?" >> $R/prof_$tag.log
rm -rf $R/prof_$tag/hlo_*
cd $OUT && tar czf run13_call6.tgz run13 && rm -rf $R
tar xzf run13_call6.tgz -O run13/prof_cupti.log | grep "kernels,\|rc=\|rror" | tail -20
