#!/usr/bin/env bash
# milroi end to end on embedded defaults, as a user would run it step by step:
# synthetic Camelyon16-like slides (plain and hard) -> ResNet-50 features -> MIL training tracked
# in MLflow -> evaluation on held-out slides -> ONNX export, registration, promotion -> gRPC
# server following the champion alias -> the client scores the held-out slides -> result files
# -> the hard round -> a slide unlike the training slides, flagged out of domain.
# Everything lands in demo_out/ (override with DEMO_OUT); rerunning reuses finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

OUT=${DEMO_OUT:-demo_out}
SIZE=${DEMO_SIZE:-3072x3072}
PORT=${DEMO_PORT:-50077}
HEAD=${DEMO_HEAD:-chowder}
MODEL=milroi-demo
mkdir -p "$OUT"
# Every milroi command (and MLflow itself) reads the tracking URI from here: set once.
export MLFLOW_TRACKING_URI="sqlite:///$(cd "$OUT" && pwd)/mlflow.db"   # absolute, from anywhere

step() { printf '\n==> %s\n' "$*"; }

step "1/9 synthetic slides: a training set of plain and hard slides (per-slide stains, pen,
      marker, blur), a held-out set (different seeds)"
[ -f "$OUT/train/reference.csv" ] || milroi-train synth "$OUT/train" --tumor 8 --normal 8 --size "$SIZE" --seed 1
# As many hard training slides as plain ones, made apart (hard_tumor_001, ...), join the
# training folder: the model then knows the stains and artefacts of the hard round, which is
# in its domain.
if ! grep -q '^hard_' "$OUT/train/reference.csv"; then
    milroi-train synth "$OUT/train_hard" --tumor 8 --normal 8 --size "$SIZE" --seed 4 --hard --prefix hard_
    cp "$OUT"/train_hard/hard_* "$OUT/train/"
    tail -n +2 "$OUT/train_hard/reference.csv" >> "$OUT/train/reference.csv"
fi
[ -f "$OUT/heldout/reference.csv" ] || milroi-train synth "$OUT/heldout" --tumor 4 --normal 4 --size "$SIZE" --seed 2

step "2/9 ResNet-50 features of every tissue tile (random-init backbone: no ImageNet download here)"
milroi-train features "$OUT/train" --out "$OUT/features/train" --weights none
milroi-train features "$OUT/heldout" --out "$OUT/features/heldout" --weights none

step "3/9 MIL training on slide labels, tracked in MLflow ($MLFLOW_TRACKING_URI)"
milroi-train fit "$OUT/features/train" --labels "$OUT/train/reference.csv" --head "$HEAD" \
    --annotations "$OUT/train" \
    --folds 4 --seed 0 --experiment milroi-demo | tee "$OUT/fit.log"
RUN_ID=$(sed -n 's/^run_id=//p' "$OUT/fit.log" | tail -n 1)

step "4/9 evaluation on held-out slides (slide AUC, patch AUC against the XML, FROC)"
milroi-train evaluate "$RUN_ID" --features "$OUT/features/heldout" --labels "$OUT/heldout/reference.csv" \
    --annotations "$OUT/heldout" | tee "$OUT/evaluate.log"

step "5/9 ONNX export, registration as a model version, promotion to @champion"
milroi-train export "$RUN_ID" --name "$MODEL" | tee "$OUT/export.log"
VERSION=$(sed -n "s/^$MODEL version \([0-9]*\) .*/\1/p" "$OUT/export.log" | tail -n 1)
milroi-train promote "$MODEL" "$VERSION" --alias champion --force

step "6/9 gRPC server on 127.0.0.1:$PORT serving models:/$MODEL@champion"
milroi-serve serve --model "models:/$MODEL@champion" \
    --slide-root "$OUT/heldout" --host 127.0.0.1 --port "$PORT" > "$OUT/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill -TERM $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null || true' EXIT

# the client retries UNAVAILABLE with backoff while the server starts and loads the model
milroi-serve client model --server "127.0.0.1:$PORT" --retries 8

step "7/9 the client scores every held-out slide through the server"
milroi-serve score "$OUT/heldout" --server "127.0.0.1:$PORT" --out "$OUT/scores"
column -s, -t < "$OUT/scores/summary.csv" || cat "$OUT/scores/summary.csv"
printf '\nResults in %s/scores: per-slide patch CSV, QuPath GeoJSON, heatmap PNG, Spatiopath JSON.\n' "$OUT"

step "8/9 hard round: unseen hard slides (per-slide stains, pale included; pen, marker and blur
      across the tissue; micro-metastases only on half the tumour slides; synth --hard)"
[ -f "$OUT/hard/reference.csv" ] || milroi-train synth "$OUT/hard" --tumor 4 --normal 4 --size "$SIZE" --seed 3 --hard
column -s, -t < "$OUT/hard/synth.csv" || cat "$OUT/hard/synth.csv"
milroi-train features "$OUT/hard" --out "$OUT/features/hard" --weights none
milroi-train evaluate "$RUN_ID" --features "$OUT/features/hard" --labels "$OUT/hard/reference.csv" \
    --annotations "$OUT/hard" | tee "$OUT/evaluate_hard.log"
milroi-serve score "$OUT/hard" --model "models:/$MODEL@champion" --out "$OUT/hard_scores"
column -s, -t < "$OUT/hard_scores/summary.csv" || cat "$OUT/hard_scores/summary.csv"
printf '\nThe model saw hard slides in training; in_domain says whether each slide of this round\n'
printf 'is like them. Tiles under ink, on glass or out of focus are flagged (artefact_tiles; the\n'
printf '"artefact" column of each patch CSV) and left out of the slide score and the ROIs.\n'

step "9/9 a slide unlike the training slides: held-out tumor_001 scanned at half the resolution
      (0.486 um/px, synth --mpp 0.486, same seed): the model flags it out of domain"
[ -f "$OUT/shifted/reference.csv" ] || milroi-train synth "$OUT/shifted" --tumor 1 --normal 0 --size "$SIZE" --seed 2 --mpp 0.486
milroi-serve score "$OUT/shifted" --model "models:/$MODEL@champion" --out "$OUT/shifted_scores"
python - "$OUT/shifted_scores/summary.csv" <<'EOF'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    print(f"{row['slide']}: {row['label']} ({row['decision']}), in_domain {row['in_domain']}, "
          f"domain_score {row['domain_score']}\n  {row['domain_reasons']}")
EOF

# The results in a browser (milroi-serve view): the command is printed; DEMO_VIEW=1 runs it, with
# live scoring through the server above (Ctrl-C stops the viewer and the server).
VIEW_PORT=${DEMO_VIEW_PORT:-8080}
ABS_OUT=$(cd "$OUT" && pwd)
VIEW_CMD="milroi-serve view $ABS_OUT/scores --slides $ABS_OUT/heldout --port $VIEW_PORT"
step "view the results in a browser"
printf '  %s\n' "$VIEW_CMD" \
    "milroi-serve view $ABS_OUT/hard_scores --slides $ABS_OUT/hard --port $VIEW_PORT   # the hard round"
printf 'add --server HOST:PORT of a running `milroi-serve serve` (slide root %s/heldout) for live\n' "$ABS_OUT"
printf 'scoring, or run `DEMO_VIEW=1 make demo` to start the viewer with the demo server.\n'
if [ "${DEMO_VIEW:-0}" = 1 ]; then
    printf '\nopen http://127.0.0.1:%s/ (Ctrl-C to stop)\n' "$VIEW_PORT"
    $VIEW_CMD --server "127.0.0.1:$PORT"
fi
