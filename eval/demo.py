"""The README's main job on the default model (grows with the project).

Loads the bundled trained adapter `smollm2-135m-nli` (SmolLM2-135M backbone, GGUF dequantised and cached on first
use) next to an untrained suffix, prints their cosine similarities on a few sentences, saves the trained adapter,
exports it as a plain SentenceTransformer and checks that both reload to the same embeddings.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

import spt_embed

SENTENCES = [
    "A man is playing a flute.",
    "A man plays the flute.",
    "A woman is slicing an onion.",
    "Stock markets fell sharply on Monday.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--output", default="out/demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)

    untrained = spt_embed.SuffixPromptEncoder.from_backbone(args.backbone, num_tokens=16, init="text")
    model = spt_embed.load("smollm2-135m-nli")
    for title, encoder in (("untrained suffix, PromptEOL-tail init", untrained), ("bundled smollm2-135m-nli", model)):
        emb = encoder.encode(SENTENCES)
        sim = encoder.similarity(emb, emb).numpy()
        print(f"\nCosine similarities ({title}):")
        for i, text in enumerate(SENTENCES):
            print(f"  {' '.join(f'{v:5.2f}' for v in sim[i])}  {text}")

    model.save(str(out / "adapter"))
    size = sum(f.stat().st_size for f in (out / "adapter").rglob("*") if f.is_file())
    print(f"\nadapter saved to {out / 'adapter'} ({size / 1024:.1f} KB, no backbone inside)")
    reloaded = spt_embed.load(out / "adapter").encode(SENTENCES)
    spt_embed.export(out / "adapter", out / "plain", overwrite=True)
    plain = SentenceTransformer(str(out / "plain")).encode(SENTENCES)
    print(f"reloaded adapter  max |diff| = {np.abs(reloaded - emb).max():.2e}")
    print(f"plain export      max |diff| = {np.abs(plain - emb).max():.2e}  (loads with no custom code)")


if __name__ == "__main__":
    main()
