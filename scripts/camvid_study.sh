#!/usr/bin/env bash
# The CamVid study of docs/results.md: the same schedule (jobs/configs/camvid_study.yaml)
# for every row, in one process each, evaluated on CamVid val (101 images, half resolution).
# Reads ../shared/data/camvid. Usage: bash scripts/camvid_study.sh [extra --set flags]
set -euo pipefail
cd "$(dirname "$0")/.."
spec=jobs/configs/camvid_study.yaml
one_student='students=[{model: deeplabv3plus_resnet18, seed: 0, decoder_channels: 128}]'
run() {  # name, then --set flags
  local name=$1; shift
  echo "== $name"
  .venv/bin/seminar train --in-process --config "$spec" --set "storage.run_name=study-$name" "$@" "${EXTRA[@]}" \
    2>&1 | tr '\r' '\n' | grep -v "^train:" | tee "runs/camvid_study/$name.log"
}
EXTRA=("$@")
mkdir -p runs/camvid_study
run full     --set "$one_student" --set method.supervision=dense --set method.w_ts=0 --set method.w_ss=0
run pce      --set "$one_student" --set method.w_ts=0 --set method.w_ss=0
run seminar
