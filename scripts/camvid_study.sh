#!/usr/bin/env bash
# The CamVid study of docs/results.md: one schedule (jobs/configs/camvid.yaml) and the same
# ImageNet EfficientNet-Lite0 primary network for every row, 3 seeds per row, in one process
# each, evaluated on CamVid val (101 images, half resolution). Reads ../shared/data/camvid.
# Each run leaves runs/camvid/study-ROW-sSEED/metrics.jsonl; summarise with
#   .venv/bin/python scripts/study_table.py runs/camvid
# Usage: bash scripts/camvid_study.sh [ROWS] [SEEDS] [extra --set flags]
#   (STUDY_TAG=x in the environment names the runs study-ROW-x-sSEED; ROUND0=run dir: the
#   model the pce_1pc_ft row starts from, default runs/camvid/study-pce2_1pc-s0)
#   e.g.  bash scripts/camvid_study.sh "seminar pce" "0 1 2" --set optim.steps=300
set -euo pipefail
cd "$(dirname "$0")/.."
spec=jobs/configs/camvid.yaml
rows=${1:-"full pce mt cps seminar"}
seeds=${2:-"0 1 2"}
shift 2 || true
one_student='students=[{model: deeplabv3plus_efficientnet_lite0, pretrained: imagenet, seed: 0, decoder_channels: 128}]'
# photometric augmentation of the strong views: the ancillary student's (milder) and none
mild='{color_jitter: 0.3, hue: 0.05, blur_prob: 0.3, grayscale_prob: 0.1}'
none='{color_jitter: 0, hue: 0, blur_prob: 0, grayscale_prob: 0}'
one_per_class='data.simulated_clicks_per_class=1'
# the next round of an annotation loop: one student fine-tuned from round 0's teacher 0
round0=${ROUND0:-runs/camvid/study-pce2_1pc-s0}
from_round0="students=[{model: deeplabv3plus_efficientnet_lite0, init_from: $round0, seed: 0, decoder_channels: 128}]"
long='optim.steps=1000|schedule.eval_every=250|schedule.checkpoint_every=250'
row_flags() {
  case $1 in
    full)    echo "$one_student|method.supervision=dense|method.w_ts=0|method.w_ss=0" ;;
    pce)     echo "$one_student|method.w_ts=0|method.w_ss=0" ;;
    mt)      echo "$one_student|method.w_ss=0|method.w_ts=1" ;;  # camvid.yaml's w_ts is 0 since session 12
    cps)     echo "method.w_ts=0|method.pseudo_from=student" ;;
    seminar) echo "" ;;  # camvid.yaml's defaults (since session 12: w_ts 0, CutMix 0.5, ss_class_fraction 0.5)
    seminar_s4) echo "method.w_ts=1|method.cutmix_prob=0|method.ss_class_fraction=0" ;;  # session 4's seminar row
    # ablations
    pce2)         echo "method.w_ts=0|method.w_ss=0" ;;  # both students, independent: their ensemble
    pce_pixel)    echo "$one_student|method.w_ts=0|method.w_ss=0|method.sup_norm=pixel" ;;
    pce_pair)     echo "$one_student|method.w_ts=0|method.w_ss=0|method.w_pair=1" ;;
    seminar_pair) echo "method.w_pair=1" ;;
    seminar_frac) echo "method.ss_class_fraction=0.5|method.tau=0.7" ;;
    seminar_ema95) echo "method.ema_decay=0.95" ;;
    seminar_nots) echo "method.w_ts=0" ;;
    mt_ema95)     echo "$one_student|method.w_ss=0|method.w_ts=1|method.ema_decay=0.95" ;;
    pce_mild)     echo "$one_student|students.0.augment=$mild|method.w_ts=0|method.w_ss=0" ;;
    pce_noaug)    echo "$one_student|students.0.augment=$none|method.w_ts=0|method.w_ss=0" ;;
    pce2_mild)    echo "students.0.augment=$mild|method.w_ts=0|method.w_ss=0" ;;
    seminar_mild) echo "students.0.augment=$mild" ;;
    seminar_mild_pair) echo "students.0.augment=$mild|method.w_pair=1" ;;
    pce2_noaug)   echo "students.0.augment=$none|students.1.augment=$none|method.w_ts=0|method.w_ss=0" ;;
    seminar_noaug) echo "students.0.augment=$none|students.1.augment=$none" ;;
    seminar_ssic) echo "method.ss_norm=image_class" ;;  # loss_ss per (image, class), as loss_sup
    seminar_noaug_ssic) echo "students.0.augment=$none|students.1.augment=$none|method.ss_norm=image_class" ;;
    # the longer schedule (1000 steps, ~22 epochs): where pseudo-labels have time to pay off
    pce2_long)    echo "method.w_ts=0|method.w_ss=0|$long" ;;
    seminar_long) echo "$long" ;;
    full_long)    echo "$one_student|method.supervision=dense|method.w_ts=0|method.w_ss=0|$long" ;;
    # a click budget of one click per class per image (7.8 clicks/image instead of 17)
    pce_1pc)      echo "$one_student|method.w_ts=0|method.w_ss=0|$one_per_class" ;;
    pce_1pc_ft)   echo "$from_round0|method.w_ts=0|method.w_ss=0|$one_per_class" ;;
    pce2_1pc)     echo "method.w_ts=0|method.w_ss=0|$one_per_class" ;;
    seminar_1pc)  echo "$one_per_class" ;;
    seminar_ssic_1pc) echo "method.ss_norm=image_class|$one_per_class" ;;
    pce2_1pc_long) echo "method.w_ts=0|method.w_ss=0|$one_per_class|$long" ;;
    seminar_ssic_1pc_long) echo "method.ss_norm=image_class|$one_per_class|$long" ;;
    pce_mild_pair) echo "$one_student|students.0.augment=$mild|method.w_ts=0|method.w_ss=0|method.w_pair=1" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}
mkdir -p runs/camvid
for seed in $seeds; do
  for row in $rows; do
    name=study-$row${STUDY_TAG:+-$STUDY_TAG}-s$seed
    flags=(--set "optim.seed=$seed")
    IFS='|' read -ra parts <<< "$(row_flags "$row")"
    for p in "${parts[@]}"; do [ -n "$p" ] && flags+=(--set "$p"); done
    # student seeds (head initialisation) follow the run seed; the single-student rows
    # set their one student after the others have been listed
    flags+=(--set "students.0.seed=$((2 * seed))")
    case $row in cps|seminar*|pce2*) flags+=(--set "students.1.seed=$((2 * seed + 1))") ;; esac
    echo "== $name $(date +%T)"
    /usr/bin/time -f "$name wall %e s, cpu %U+%S s" .venv/bin/seminar train --in-process --config "$spec" \
      --set "storage.run_name=$name" "${flags[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -v "^train:" \
      > "runs/camvid/$name.log" || echo "$name failed"
    tail -1 "runs/camvid/$name.log"
  done
done
