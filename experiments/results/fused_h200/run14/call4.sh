#!/bin/bash
# Run 14, call 4 (H200, nothing carried). Call 3's decode HLO: `input_concatenate_fusion`
# (25 us a layer) writes bf16[4096,6144], the layer's q, k and v weights concatenated by
# XLA's GPU dot merger so that the three projections of one x run as one product; it is
# copied on every layer of every step (the weights are slices of the stacked layers inside
# the scan). llama.py now gives the three products inputs XLA cannot tell are one
# (`lax.optimization_barrier((x, x, x))`). A B C A B C, llama3-8b's 32 layers, random
# weights: A that code, B the same with the barrier taken out (the code before), C B with the
# merger off by XLA's flag (--xla_gpu_dot_merger_threshold_mb=0). The first A also dumps the
# decode HLO: no [4096,6144] concatenate must be left.
set -u
R=$OUT/run14; mkdir -p $R/hlo4
cp hydrax/models/llama.py /tmp/llama_a.py
python3 - <<'PY'
src = open("/tmp/llama_a.py").read()
line = "  xq, xk, xv = lax.optimization_barrier((x, x, x))\n"
assert src.count(line) == 1
open("/tmp/llama_b.py", "w").write(src.replace(line, "  xq = xk = xv = x\n"))
PY
run() {   # tag, llama file, extra XLA flags
  cp $2 hydrax/models/llama.py
  XLA_FLAGS="$3" timeout 150 python3 experiments/bench_engine.py --points 4096x256,1024x64 \
    --new-tokens 8 --backend pallas --no-dump --out $R/ab_$1 > $R/ab_$1.log 2>&1
  echo "rc=$?" >> $R/ab_$1.log
}
run A1 /tmp/llama_a.py "--xla_dump_to=$R/hlo4 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*"
find $R/hlo4 -type f ! -name "*after_optimizations.txt" -delete
grep -l "bf16\[4096,6144\]" $R/hlo4/* > $R/hlo4_concat.txt 2>&1; echo "files with a [4096,6144] array: $(wc -l < $R/hlo4_concat.txt)" >> $R/hlo4_concat.txt
grep -c "custom_call_target=\"__cublas" $R/hlo4/*after_optimizations.txt >> $R/hlo4_concat.txt
rm -rf $R/hlo4
run B1 /tmp/llama_b.py ""
run C1 /tmp/llama_b.py "--xla_gpu_dot_merger_threshold_mb=0"
run A2 /tmp/llama_a.py ""
run B2 /tmp/llama_b.py ""
run C2 /tmp/llama_b.py "--xla_gpu_dot_merger_threshold_mb=0"
cp /tmp/llama_a.py hydrax/models/llama.py
cd $OUT && tar czf run14_call4.tgz run14 && rm -rf $R
tar xzf run14_call4.tgz -O run14/hlo4_concat.txt
for t in A1 B1 C1 A2 B2 C2; do
  echo "$t: $(tar xzf run14_call4.tgz -O run14/ab_$t.log | grep '^| [0-9]\|rc=' | tr '\n' ' ')"
done
