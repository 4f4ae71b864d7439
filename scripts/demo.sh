#!/usr/bin/env bash
# The demo, end to end on a CPU: install, synthesise data, train the 3-stage recipe, evaluate on the
# held-out split, export to plain transformers, reload the export and answer a question, summarise.
# Re-running resumes (committed stages are skipped); `rm -rf runs/demo` starts over.
# Extra arguments are recipe overrides, e.g.  ./scripts/demo.sh stages.2.steps=200
set -euo pipefail
START=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
RUN="${RUN:-runs/demo}"  # e.g. RUN=runs/demo_mma ./scripts/demo.sh model.attention.mode=mma
DATA=data/demo

if [ ! -f "$DATA/tokenizer/tokenizer.json" ]; then
  echo "[demo] 1/5 synthesising the shapes world into $DATA"
  mllm data synth --out "$DATA" --seed 0 --n-train 20000 --n-heldout 1000 > /dev/null
else
  echo "[demo] 1/5 data already in $DATA"
fi

echo "[demo] 2/5 training (stage 0 CLIP -> stage 1 align -> stage 2 instruct) into $RUN"
mllm train configs/recipes/demo.yaml run.output_dir="$RUN" "$@"

echo "[demo] 3/5 held-out evaluation (greedy, KV cache) -> $RUN/eval.json"
if [ ! -f "$RUN/eval.json" ]; then  # the recipe's eval section already wrote it at the end of training
  mllm eval --model "$RUN/model" --data "$DATA/wds/heldout-vqa-*.tar" --max-samples 400 --batch-size 64 \
    --out "$RUN/eval.json"
fi

echo "[demo] 4/5 exporting to $RUN/export (loads with plain transformers)"
rm -rf "$RUN/export"
mllm export "$RUN" "$RUN/export"  # the run's eval.json and recipe go into the model card

echo "[demo] 5/5 reloading the export with transformers only and asking a question"
python scripts/demo_summary.py --run "$RUN" --data "$DATA" --started "$START"
