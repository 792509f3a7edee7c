"""Encoding speed and fidelity of bfloat16 weights against float32, on the bundled SmolLM2 encoder.

    python eval/bench_dtype.py          # writes eval/results/bench_dtype.json and prints a table

For each text set (the first `--docs` SciFact documents, title + text as mteb joins them; the first `--sentences`
STS-B test sentences) and each dtype: texts/s of `model.encode` (batch 32, after a warm-up batch), and the cosine
between the bfloat16 and the float32 embedding of each text (min and mean). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import spt_embed
from spt_embed.datafiles import load_sts, scifact_documents


def stsb_sentences(limit: int) -> list[str]:
    first, second, _ = load_sts("test")
    return [text for pair in zip(first, second) for text in pair][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-nli")
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--out", default="eval/results/bench_dtype.json")
    args = parser.parse_args()
    sets = {"scifact_docs": scifact_documents(args.docs), "stsb_sentences": stsb_sentences(args.sentences)}
    record: dict = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(), "sets": {}}
    embeddings: dict[tuple[str, str], np.ndarray] = {}
    for dtype in ("float32", "bfloat16"):
        model = spt_embed.load(args.model, dtype=dtype)
        for name, texts in sets.items():
            model.encode(texts[:32], batch_size=32)  # warm-up
            start = time.perf_counter()
            embeddings[name, dtype] = model.encode(texts, batch_size=32, convert_to_numpy=True)
            seconds = time.perf_counter() - start
            record["sets"].setdefault(name, {"texts": len(texts)})[f"{dtype}_texts_per_s"] = round(len(texts) / seconds, 2)
    print(f"{'texts':16s} {'n':>5s} {'fp32/s':>8s} {'bf16/s':>8s} {'speed-up':>8s} {'cos min':>8s} {'cos mean':>8s}")
    for name, entry in record["sets"].items():
        cosines = (embeddings[name, "float32"] * embeddings[name, "bfloat16"]).sum(axis=1)
        entry.update(
            speedup=round(entry["bfloat16_texts_per_s"] / entry["float32_texts_per_s"], 2),
            cosine_min=round(float(cosines.min()), 4),
            cosine_mean=round(float(cosines.mean()), 4),
        )
        print(f"{name:16s} {entry['texts']:5d} {entry['float32_texts_per_s']:8.2f} {entry['bfloat16_texts_per_s']:8.2f} "
              f"{entry['speedup']:8.2f} {entry['cosine_min']:8.4f} {entry['cosine_mean']:8.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
