"""STS-B Spearman (cosine, x100) of an encoder on the bundled data, with sentence-transformers' evaluator.

    python eval/stsb.py --model out/smollm2-nli --split test      # appends to eval/results/stsb.jsonl

`--split dev` is for model selection; `test` is for reporting only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

from spt_embed.datafiles import load_sts
from spt_embed.model.encoder import open_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="adapter folder, bundled adapter or SentenceTransformer folder")
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--results", default="eval/results/stsb.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    s1, s2, scores = load_sts(args.split)
    model = open_encoder(args.model)
    evaluator = EmbeddingSimilarityEvaluator(
        s1, s2, scores, name=f"stsb-{args.split}", batch_size=args.batch_size, show_progress_bar=True, write_csv=False
    )
    start = time.perf_counter()
    metrics = evaluator(model)
    spearman = 100 * metrics[f"stsb-{args.split}_spearman_cosine"]
    record = {
        "model": args.model,
        "split": args.split,
        "pairs": len(s1),
        "spearman_cosine_x100": round(spearman, 2),
        "seconds": round(time.perf_counter() - start, 1),
        "command": f"python eval/stsb.py --model {args.model} --split {args.split}",
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"STS-B {args.split} ({len(s1)} pairs) Spearman x100: {spearman:.2f}   [{args.model}]")


if __name__ == "__main__":
    main()
