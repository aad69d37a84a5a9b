#!/bin/bash
# Run 13, call 5 (H200, `.peer` carried: FlashInfer 0.7.2.post1 re-packed and its
# dependencies, WORKSPACE.md "Packages for the device machine"): FlashInfer's cascade by the
# op's device time alone, as call 3 timed hydrax and the copied-prefix baselines (run 5 timed
# it with CUDA events around eager calls). Its JIT modules are built first, outside ncu.
set -u
R=$OUT/run13; mkdir -p $R
bash experiments/install_peers.sh .peer > $R/install.log 2>&1; echo "install rc=$?" >> $R/install.log
export PYTHONPATH=/tmp/site
timeout 200 python3 - > $R/fi_warm.log 2>&1 <<'PY'
import time, jax, numpy as np
from experiments import bench_attention as ba, peers
t = time.time()
case = ba.make_case(jax.random.key(0), 16, 1024, 128, 32, 8, 128)
f, _ = peers.flashinfer_call(16, 1024, 128, 32, 8, 128, case)
out = f().float().cpu().numpy()
from experiments import check_fused_h200 as cf
ref = np.asarray(cf.hydrax_fn(16, 1024, 128, "xla")(*case, *ba.plan_inputs(case), jax.numpy.int32(0))[:, 0], np.float32)
print(f"flashinfer built and ran in {time.time() - t:.0f} s; rel err vs XLA "
      f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}")
PY
echo "warm rc=$?" >> $R/fi_warm.log
SHAPES=1024x16,512x32,4096x64,4096x256,16384x256,32768x256
tag=flashinfer
timeout 300 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --log-file $R/ncu_$tag.csv python3 experiments/profile_decode_h200.py --shapes $SHAPES \
  --calls 3 --peers flashinfer --out $R/prof_$tag > $R/prof_$tag.log 2>&1
echo "ncu rc=$?" >> $R/prof_$tag.log
python3 experiments/profile_decode_h200.py --parse $R/ncu_$tag.csv --shapes $SHAPES --calls 3 \
  --peers flashinfer >> $R/prof_$tag.log 2>&1
rm -rf $R/prof_$tag/hlo_*
cd $OUT && tar czf run13_call5.tgz run13 && rm -rf $R
tar xzf run13_call5.tgz -O run13/install.log | tail -2
tar xzf run13_call5.tgz -O run13/fi_warm.log | grep -v "^W\|^I0\|absl" | tail -3
tar xzf run13_call5.tgz -O run13/prof_flashinfer.log | grep -v "^==" | grep "kernels\|rc=\|rror" | tail -14
