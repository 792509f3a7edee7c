#!/usr/bin/env bash
# One-parameter sweep around the recipe (each run: the recipe's 60 steps, STS-B dev on 500 random pairs at the end).
#   bash train/sweep.sh lr 1e-3 3e-3 1e-2
#   bash train/sweep.sh num_tokens 8 32
#   bash train/sweep.sh init random vocab
# -> out/sweep/<param><value>/ ; one line per run appended to train/results/sweep.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
param=$1; shift
[ $# -gt 0 ] || { echo "usage: bash train/sweep.sh PARAM VALUE [VALUE ...]   (PARAM: a TrainConfig field)" >&2; exit 2; }
for value in "$@"; do
  out="out/sweep/$param$value"
  start=$(date +%s)
  .venv/bin/spt-embed train --config train/configs/smollm2-nli.yaml --output "$out" "--${param//_/-}" "$value" \
    --max-steps 60 --eval-steps 60 --save-steps 60
  .venv/bin/python - "$param" "$value" "$out" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
param, value, out, seconds = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{out}/train_log.jsonl")]
dev = [r for r in rows if "eval_stsb-dev_spearman_cosine" in r][-1]
record = {"param": param, "value": value, "steps": dev["step"], "minutes": round(int(seconds) / 60, 1),
          "stsb_dev500_spearman_x100": round(100 * dev["eval_stsb-dev_spearman_cosine"], 2)}
open("train/results/sweep.jsonl", "a").write(json.dumps(record) + "\n")
print(record)
PY
done
