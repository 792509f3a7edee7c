#!/usr/bin/env bash
# Issue 17's in-domain recipe on a lent GPU, as a *selection* sweep: each run is the row
# deep-suffix-query-document-IN-DOMAIN-lr3e-2 of train/configs/retrieval-60.yaml with one change, scored on the dev sets
# the training holds out of its own presets (STS-B dev, and 200 seeded rows each of squad-qa, medquad-qa and
# scifact-train: SciFact *train* claims, never its test queries). Nothing here reads a reported split.
# Usage on the device: bash train/gpu/indomain_sweep.sh BACKBONE.gguf OUT_DIR [NAME ...]
set -uo pipefail
backbone=$1; out=$2; shift 2
names=${*:-base seed43 steps240 oversample32}
common=(--config train/configs/smollm2-retrieval.yaml --backbone "$backbone" --lr 3e-2
        --data snli-triplets stsb-train-scored mrpc-pairs squad-qa medquad-qa scifact-train --logging-steps 5)
for name in $names; do
  case $name in
    base)        extra=(--oversample scifact-train=16) ;;
    seed43)      extra=(--oversample scifact-train=16 --seed 43) ;;
    oversample32) extra=(--oversample scifact-train=32) ;;
    steps240)    extra=(--oversample scifact-train=16 --max-steps 240 --warmup-steps 24 --eval-steps 80 --save-steps 80) ;;
    steps240-oversample32) extra=(--oversample scifact-train=32 --max-steps 240 --warmup-steps 24 --eval-steps 80 --save-steps 80) ;;
    *) echo "unknown run $name"; exit 2 ;;
  esac
  echo "=== $name $(date -u +%T)"
  start=$(date +%s)
  python3 -m spt_embed train "${common[@]}" "${extra[@]}" --output "$out/$name" --overwrite > "$out/$name.log" 2>&1
  echo "=== $name rc $? $(( $(date +%s) - start )) s"
  rm -rf "$out/$name/checkpoints"
done
