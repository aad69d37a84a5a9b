#!/bin/bash
# Session 20 (H200, nothing carried): the split-merge probe. Its output beyond the table
# (results.json, probe.log) did not come back (too many files under $OUT); the call's printed
# tail is `probe_merge/output_tail.txt`.
export PYTHONPATH=$PWD; mkdir -p $OUT/merge
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $OUT/merge/gpu.txt
timeout 400 python3 experiments/probe_split_merge.py --out $OUT/merge > $OUT/merge/probe.log 2>&1
echo "rc=$?" >> $OUT/merge/probe.log
cd $OUT/merge && for f in hlo_*.txt; do cut -c1-2000 $f > $f.cut && mv $f.cut $f; done
grep -v "^check" probe.log | tail -20; grep -c "ok$" probe.log
python3 -c "
import json
for r in json.load(open('results.json')): print(r['form'], r['B'], r['launches'], r['kernels'])
" | cut -c1-400
