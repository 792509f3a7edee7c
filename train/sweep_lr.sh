#!/usr/bin/env bash
# Short learning-rate sweep for the recipe (60 steps each, STS-B dev on 500 random pairs at the end).
#   bash train/sweep_lr.sh  ->  out/sweep/lr*/train_log.jsonl ; summary in train/results/sweep_lr.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
for lr in ${LRS:-1e-3 3e-3 1e-2}; do
  .venv/bin/spt-embed train --config train/configs/smollm2-nli.yaml --output "out/sweep/lr$lr" --lr "$lr" \
    --max-steps 60 --eval-steps 60 --save-steps 60
  python3 - "$lr" <<'PY'
import json, sys
lr = sys.argv[1]
rows = [json.loads(l) for l in open(f"out/sweep/lr{lr}/train_log.jsonl")]
dev = [r for r in rows if "eval_stsb-dev_spearman_cosine" in r][-1]
rec = {"lr": float(lr), "steps": dev["step"], "stsb_dev500_spearman_x100": round(100 * dev["eval_stsb-dev_spearman_cosine"], 2)}
open("train/results/sweep_lr.jsonl", "a").write(json.dumps(rec) + "\n")
print(rec)
PY
done
