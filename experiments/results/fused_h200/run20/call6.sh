#!/bin/bash
# Run 20, call 6 (session 24): calls 3 and 5 (1) in one command, for a session that got no
# machine for an hour of tries (each a minute and a half of device time): the engine's decode
# loop checked on the GPU (call 3: check_engine.py, pallas backend, check_every 1 and 4,
# against the model's float32 forward pass), then the scoring benchmark with choices of 1-4
# tokens (call 5 (1): hydragen / replicated x score's decode / prefill methods), each within
# what is left of BUDGET seconds (default 570); QUESTIONS (default 128) for the second.
set -u; R=$OUT/run20; mkdir -p $R; export PYTHONPATH=$PWD; T0=$SECONDS; B=${BUDGET:-570}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/gpu6.txt
timeout $(( B < 240 ? B - 10 : 230 )) python3 experiments/check_engine.py --backend pallas --check-every 1,4 \
  --out $R/engine_pallas > $R/engine_pallas.log 2>&1
echo "rc=$? after $((SECONDS - T0)) s" >> $R/engine_pallas.log
LEFT=$((B - (SECONDS - T0)))
if [ $LEFT -ge 150 ]; then
  timeout $LEFT python3 experiments/bench_score.py --batch 128 \
    --questions ${QUESTIONS:-128} --out $R/score4 > $R/score4.log 2>&1
  echo "rc=$? after $((SECONDS - T0)) s" >> $R/score4.log
else
  echo "not run: $LEFT s left of $B" > $R/score4.log
fi
cd $OUT && tar czf run20_call6.tgz run20 && rm -rf $R
tar xzf run20_call6.tgz -O run20/engine_pallas.log | grep "^|\|rc=\|Error\|error" | tail -12
echo "== score4"; tar xzf run20_call6.tgz -O run20/score4.log | grep -v "^hydrax.sharing" | tail -9
