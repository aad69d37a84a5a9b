#!/bin/bash
# Run 13, call 2 (H200, nothing carried). Call 1: under ncu the path call's kernels take
# 19.9 / 20.2 us at 1K/16 and 512/32 (path kernel + split merge), less than torch SDPA's
# one cuDNN kernel (22.4 / 24.4 us), yet its device time in the jitted loop of dependent
# calls was 34-51 us against torch's 26.6 / 29.0 (a CUDA graph). Is XLA's loop bound by
# launching kernels from the host? (1) The same rows under XLA's command-buffer settings
# (default; off; every kind on with graphs of one op up), with the optimised HLO of the loop
# dumped (is the Triton kernel inside a command buffer?); (2) the engine's decode step
# (llama3-8b random weights, 4K/256) under the default and the all-on setting.
set -u
R=$OUT/run13; mkdir -p $R
pack() { (cd $OUT && tar czf run13_call2.tgz run13); }
ALL="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
i=0
for flags in "" "--xla_gpu_enable_command_buffer=" "$ALL"; do
  tag=small_flags$i
  echo "XLA_FLAGS=$flags" > $R/$tag.log
  XLA_FLAGS="$flags --xla_dump_to=$R/dump$i --xla_dump_hlo_module_re=.*run.* --xla_dump_hlo_as_text" \
    timeout 110 python3 experiments/check_fused_h200.py --out $R/$tag --budget 100 \
    --timing-reserve 95 --outer 9 --checks none --shapes 1024x16,512x32,4096x16 \
    --impls pallas,torch_sdpa --variants '[]' \
    --path-variants '[{"path_programs_per_sm": 4}]' >> $R/$tag.log 2>&1
  echo "check rc=$?" >> $R/$tag.log
  # keep only the optimised HLO of the loops, and say whether command buffers formed
  find $R/dump$i -type f ! -name "*after_optimizations.txt" -delete 2>/dev/null
  grep -l "command_buffer" $R/dump$i/* 2>/dev/null | wc -l > $R/dump${i}_cmdbuf_files.txt
  i=$((i + 1)); pack
done
for flags in "" "$ALL"; do
  tag=engine_flags$i
  echo "XLA_FLAGS=$flags" > $R/$tag.log
  XLA_FLAGS="$flags" timeout 100 python3 experiments/bench_engine.py --points 4096x256 \
    --new-tokens 32 --backend pallas --no-dump --out $R/$tag >> $R/$tag.log 2>&1
  echo "engine rc=$?" >> $R/$tag.log
  i=$((i + 1)); pack
done
cd $OUT && rm -rf $R
for i in 0 1 2; do
  tar xzf run13_call2.tgz -O run13/small_flags$i.log | grep "XLA_FLAGS\|device\|FAIL\|rc=" | cut -c1-150
  echo "command-buffer files: $(tar xzf run13_call2.tgz -O run13/dump${i}_cmdbuf_files.txt)"
done
for i in 3 4; do
  tar xzf run13_call2.tgz -O run13/engine_flags$i.log | grep "XLA_FLAGS\|step\|rc=" | tail -4
done
