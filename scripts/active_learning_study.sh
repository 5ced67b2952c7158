#!/usr/bin/env bash
# The active-learning study of docs/results.md: does a click where the students' teachers
# disagree teach more than a click elsewhere? From a trained two-student model (round 0),
# scripts/active_learning_clicks.py adds N clicks per CamVid training image seven ways
# (suggested, disagreement_max, least_confident, random, segments, weighted, balanced; a simulated annotator labels them
# from the masks); then one student is retrained on the same schedule, from ImageNet weights, with the
# round-0 clicks (one per class per image) plus each arm's, and without (none).
# Runs land in runs/camvid/study-pce_1pc-al-ARM-sSEED; summarise with
#   .venv/bin/python scripts/study_table.py runs/camvid --rows pce_1pc-al-none pce_1pc-al-random \
#     pce_1pc-al-least_confident pce_1pc-al-suggested pce_1pc-al-disagreement_max pce_1pc-al-segments pce_1pc-al-weighted pce_1pc-al-balanced
# ROUND1=pce_1pc_ft in the environment fine-tunes round 0's teacher instead (the loop as a
# user runs it: students.0.init_from); runs then land in runs/camvid/study-pce_1pc_ft-al-ARM-sSEED.
# Usage: bash scripts/active_learning_study.sh [ROUND0_RUN] [SEEDS] [CLICKS] [ARMS]
#   round 0 (two students, one click per class, seed 0): bash scripts/camvid_study.sh pce2_1pc 0
#   e.g. one more arm on the picks already made: bash scripts/active_learning_study.sh "" "0 1 2" 4 segments
# About 2.5 min a run alone on 2 cores (24 runs), plus 1.5 min for the picks.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-runs/camvid/study-pce2_1pc-s0}
seeds=${2:-"0 1 2"}
clicks=${3:-4}
arms=${4:-"none random least_confident suggested disagreement_max segments weighted balanced"}
out=runs/camvid/al
[ -f "$out/summary.json" ] || .venv/bin/python scripts/active_learning_clicks.py "$model" --clicks "$clicks" --out "$out"
for seed in $seeds; do
  for arm in $arms; do
    extra=()
    [ "$arm" = none ] || extra=(--set "data.extra_clicks=[$out/$arm.parquet]")
    ROUND0=$model STUDY_TAG=al-$arm bash scripts/camvid_study.sh "${ROUND1:-pce_1pc}" "$seed" "${extra[@]}"
  done
done
