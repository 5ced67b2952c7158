#!/usr/bin/env bash
# The README's commands, run as a user would from the repository root: `make train`, then
# each "Using it" command that runs on one machine, with the placeholder RUN replaced by the
# runs it made (they stay under runs/, as the user's would; a model is published to
# runs/registry/seminar). The commands that need a cluster, S3 or a job id (train --address,
# submit, tune, jobs, s3:// registries) run against a real head and moto in the tests
# (tests/test_jobs.py, tests/test_cluster.py); tests/test_docs.py parses every command the
# docs show. About 11 min on 2 cores (measured: 10 min 41 s); CI runs it after `make test`.
#
#   bash scripts/readme_walk.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
step() { echo; echo "== $*"; }
newest_run() { ls -td runs/seminar-* | head -1 | xargs basename; }

# A served command: started in the background, asked for a segmentation (and, with a click
# store, given a click), then stopped with SIGTERM (as a service manager would; Ctrl-C is tested in tests/test_serving_cli.py).
serve_and_ask() {
  step "$*"
  "$@" > runs/serve.log 2>&1 &
  local pid=$! url="http://127.0.0.1:8000"
  for _ in $(seq 1 120); do
    grep -q "^serving " runs/serve.log && curl -sf "$url/readyz" > /dev/null && break  # what a user waits for
    kill -0 $pid 2>/dev/null || { cat runs/serve.log; echo "serve exited"; exit 1; }
    sleep 2
  done
  curl -sf "$url/readyz"; echo
  curl -sf -o runs/answer.png -w "POST /v1/segment: %{http_code}, %{size_download} bytes\n" \
    -H "Content-Type: image/jpeg" --data-binary @tests/data/voc_tiny/JPEGImages/2007_000033.jpg "$url/v1/segment"
  if grep -q clicks_store <<< "$*"; then
    curl -sf -w " POST /v1/clicks: %{http_code}\n" -H "Content-Type: application/json" \
      -d '{"image_id": "2007_000033", "width": 500, "height": 366, "clicks": [{"x": 10, "y": 10, "cls": 0}]}' \
      "$url/v1/clicks"
    curl -sf -w " GET /label-studio/health: %{http_code}\n" "$url/label-studio/health"
  fi
  kill -TERM $pid  # a script's background job ignores SIGINT (Ctrl-C), as shells do
  wait $pid  # exit 0 once Serve and Ray are shut down
}

step make train
make train
RUN=$(newest_run)

step seminar evaluate runs/$RUN --grid runs/grid.png
seminar evaluate "runs/$RUN" --grid runs/grid.png
test -s runs/grid.png

step seminar train --in-process
seminar train --in-process
IN_PROCESS=$(newest_run)
step seminar evaluate runs/$IN_PROCESS/checkpoints/step_0000300
seminar evaluate "runs/$IN_PROCESS/checkpoints/step_0000300"

step seminar runs list
seminar runs list
step "seminar runs show $RUN; seminar runs plot $RUN -o runs/curves.png"
seminar runs show "$RUN"; seminar runs plot "$RUN" -o runs/curves.png
test -s runs/curves.png

step seminar models publish runs/$RUN --name seminar
seminar models publish "runs/$RUN" --name seminar
step seminar models export runs/registry/seminar --out runs/model.onnx
seminar models export runs/registry/seminar --out runs/model.onnx
step seminar predict runs/registry/seminar tests/data/voc_tiny/JPEGImages --out runs/predictions
seminar predict runs/registry/seminar tests/data/voc_tiny/JPEGImages --out runs/predictions
test -s runs/predictions/predictions.parquet

serve_and_ask seminar serve runs/registry/seminar --port 8000
serve_and_ask seminar serve runs/model.onnx
serve_and_ask seminar serve runs/registry/seminar --set suggest_clicks=5 --set clicks_store=runs/clicks
ls runs/clicks/*.parquet > /dev/null

if [ -d ../shared/data/voc ]; then  # the real data, where the machine has it
  step seminar data inspect ../shared/data/voc/whats_the_point/pascal2012_trainval_main.json --masks ../shared/data/voc/VOC2012/SegmentationClass
  seminar data inspect ../shared/data/voc/whats_the_point/pascal2012_trainval_main.json --masks ../shared/data/voc/VOC2012/SegmentationClass
fi
echo; echo "README walk: every command above ran"
