#!/usr/bin/env bash
# Prepare here: scripts/rescale_camvid.py ../shared/data/camvid .gpu/camvid 0.5; wheels into .whl (see docs/results.md,
# session 12); run on the device with carry [.whl, .gpu]. This is the second call of session 12 (the seminar row).
# Device call 2: the seminar row of the curve with the chosen defaults, semF's seeds 1-2, the 1000-step point at 45.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD OMP_WAIT_POLICY=passive PYTHONUNBUFFERED=1
C=(--config jobs/configs/camvid.yaml --set data.root=.gpu/camvid --set data.load_scale=1 --set resources.torch_threads=2)
S=scripts/label_efficiency.py
start=$(date +%s)
B=${BUDGET:-390}
timeout $B python3 $S "${C[@]}" --set resources.loader_workers=5 --set optim.steps=1000 --set schedule.eval_every=250 --set schedule.checkpoint_every=250 \
  --out /tmp/le_long --jobs 2 --clicked 45 --seeds 0 --rows seminar pce2 > $OUT/long.txt 2>&1 &
timeout $B python3 $S "${C[@]}" --set resources.loader_workers=3 --out /tmp/le --jobs 3 --clicked 11 23 45 92 367 --seeds 0 --seeds-at 11=0,1,2 45=0,1,2 --rows seminar > $OUT/curve.txt 2>&1 &
timeout $B python3 $S "${C[@]}" --set resources.loader_workers=3 --out /tmp/le --jobs 1 --clicked 11 45 --seeds 1 2 \
  --row "semF=method.cutmix_prob=0.5|method.w_ts=0|method.ss_class_fraction=0" --rows semF > $OUT/semF.txt 2>&1 &
wait
echo "elapsed $(( $(date +%s) - start )) s"
cd /tmp && tar czf $OUT/runs.tgz le/*.log le/*/metrics.jsonl le/*/checkpoints/*/meta.json le_long/*.log le_long/*/metrics.jsonl le_long/*/checkpoints/*/meta.json 2>/dev/null
ls -la $OUT
