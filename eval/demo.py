"""The README's main job on the default model: train a suffix prompt, evaluate it, index a corpus.

    python eval/demo.py                      # what `make demo` runs
    python eval/demo.py --train-steps 2 --index-docs 50 --output out/demo-smoke   # a quick pass through every step
    python eval/demo.py --train-steps 0 --index-docs 0    # the whole recipe (about 75 min here) and all 5,183 documents

1. trains a shortened version of the recipe `train/configs/smollm2-nli.yaml` (SmolLM2-135M + 16 soft tokens after
   the template `This sentence : "`; the GGUF is dequantised and cached on first use) into OUTPUT/encoder: its
   options, with the schedule laid over `--train-steps` steps (default 60 of its 430) and STS-B dev selection on
   500 pairs. The full recipe's adapter is the bundled `smollm2-135m-nli`;
2. evaluates it on the STS-B test split through mteb (`spt-embed eval`), next to that bundled adapter;
3. saves, reloads and exports it as a plain SentenceTransformer and checks all give the same embeddings;
4. encodes the first `--index-docs` SciFact documents (default 400; 0 for the whole corpus of 5,183) into a FAISS
   index (OUTPUT/scifact-MODEL.index; resumable if killed) and runs a search, with `--index-model`: by default the
   bundled retrieval adapter `smollm2-135m-retrieval` (documents through its `document` prompt at up to 512 tokens,
   the query through its `query` prompt; SciFact nDCG@10 47.82 against 35.91 for `smollm2-135m-nli`; README
   "Retrieval: query and document prompts"), or `trained` (the encoder of step 1), or any model spec. Its
   512-token documents cost about 0.85 s each here, hence 400 of them by default (5.7 min measured).
   `--index-dtype auto` (the default) encodes in bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX:
   about 2x faster, README "Speed"), else in float32.
Steps that already have their output are reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed.datafiles import data_root
from spt_embed.evaluation.evaluate import evaluate
from spt_embed.model.dtypes import native_bf16
from spt_embed.recipe import has_checkpoints

RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "smollm2-nli.yaml"
SENTENCES = ["A man is playing a flute.", "A man plays the flute.", "A woman is slicing an onion."]
QUERY = "coronavirus spreads through aerosols"
INDEX_MODEL = "smollm2-135m-retrieval"  # the better SciFact encoder (47.82 nDCG@10; the recipe's adapter: 35.91)
INDEX_DOCS = 400  # 5.7 minutes at 512 tokens on 2 cores (measured); 1,000 would take the demo past 30 minutes


DEMO_STEPS = 60  # about 10 minutes of training on 2 cores (the whole recipe: 430 steps, about 75 minutes)
DEMO_DEV_PAIRS = 500  # seeded STS-B dev sample for the shortened run's selection (the recipe uses all 1,500)


def train_encoder(out: Path, steps: int) -> Path:
    encoder = out / "encoder"
    if (encoder / "soft_prompt.safetensors").exists():
        print(f"[1/4] reusing the trained suffix in {encoder}")
        return encoder
    overrides = {"output": str(encoder)}
    if steps:  # a shortened run: the recipe's schedule laid over `steps`, evaluated and checkpointed once, at its end
        overrides.update(max_steps=steps, warmup_steps=steps // 10, eval_steps=steps, save_steps=steps,
                         eval_pairs=DEMO_DEV_PAIRS)
    print(f"[1/4] training the recipe {RECIPE.name} ({f'shortened to {steps} steps' if steps else 'all of it'}) "
          f"-> {encoder}")
    # A demo killed mid-training continues from its last checkpoint; one killed before its first starts again.
    resume = has_checkpoints(encoder)
    config = spt_embed.TrainConfig.from_sources(RECIPE, **overrides)
    spt_embed.train(config, resume=resume, overwrite=encoder.exists() and not resume)
    return encoder


def corpus_file(out: Path, limit: int | None) -> Path:
    corpus = data_root() / "beir_scifact" / "corpus.jsonl"
    if not limit:
        return corpus
    subset = out / f"scifact_first{limit}.jsonl"
    with corpus.open(encoding="utf-8") as source:
        subset.write_text("".join(line for _, line in zip(range(limit), source)), encoding="utf-8")
    return subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/demo")
    parser.add_argument(
        "--train-steps", type=int, default=DEMO_STEPS, help=f"default {DEMO_STEPS}; 0: the whole recipe (430 steps)"
    )
    parser.add_argument(
        "--index-docs", type=int, default=INDEX_DOCS,
        help=f"index the first N SciFact documents (default {INDEX_DOCS}; 0: all 5,183)"
    )
    parser.add_argument(
        "--index-model",
        default=INDEX_MODEL,
        help=f"encoder of the SciFact index (default {INDEX_MODEL}): `trained` (step 1's encoder) or a model spec",
    )
    parser.add_argument(
        "--index-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights' dtype for the SciFact encoding (auto: bfloat16 if the CPU has native bf16, else float32)",
    )
    args = parser.parse_args()
    for flag, value in (("--train-steps", args.train_steps), ("--index-docs", args.index_docs)):
        if value < 0:
            parser.error(f"{flag} {value}: give a number of steps/documents >= 0 (0 means all of them)")
    if args.index_dtype == "auto":
        args.index_dtype = "bfloat16" if native_bf16() else "float32"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps: dict[str, float] = {}  # minutes of each step of this run (a reused step takes about none)

    def lap(name: str) -> None:
        steps[name] = round((time.perf_counter() - start) / 60 - sum(steps.values()), 2)

    encoder = train_encoder(out, args.train_steps)
    lap("train")

    print("[2/4] STS-B test through mteb (Spearman x100 of cosine)")
    scores = {
        "this run": evaluate(encoder, ["STSBenchmark"], out / "eval" / "encoder")["STSBenchmark"],
        "bundled smollm2-135m-nli": evaluate("smollm2-135m-nli", ["STSBenchmark"], out / "eval" / "bundled")[
            "STSBenchmark"
        ],
    }
    for name, score in scores.items():
        print(f"      {name:26s} {100 * score:6.2f}")
    lap("evaluate")

    print("[3/4] save / reload / export")
    model = spt_embed.load(encoder)
    emb = model.encode(SENTENCES)
    sim = model.similarity(emb, emb).numpy()
    for i, text in enumerate(SENTENCES):
        print(f"      {' '.join(f'{v:5.2f}' for v in sim[i])}  {text}")
    spt_embed.export(encoder, out / "plain", overwrite=True)
    plain = SentenceTransformer(str(out / "plain")).encode(SENTENCES)
    reloaded = spt_embed.load(encoder).encode(SENTENCES)
    print(f"      reloaded adapter max |diff| {np.abs(reloaded - emb).max():.2e}; plain export (no custom code) "
          f"max |diff| {np.abs(plain - emb).max():.2e}")

    lap("save_reload_export")
    index_model = str(encoder) if args.index_model == "trained" else args.index_model
    index_path = out / f"scifact-{Path(args.index_model).name}.index"  # one per encoder: never reuse another's
    print(f"[4/4] SciFact corpus -> FAISS index {index_path} with {index_model} (encoding in {args.index_dtype})")
    if not index_path.exists():
        spt_embed.index_corpus(
            index_model, corpus_file(out, args.index_docs), index_path, index_type="flat", dtype=args.index_dtype
        )
    index = spt_embed.load_index(index_path)
    hits = index.search([QUERY], 5)[0]
    lap("index_and_search")
    print(f"      {index.metadata.count} documents; top 5 for {QUERY!r}:")
    for hit in hits:
        print(f"      {hit.score:.3f}  {hit.id:>10s}  {(index.document_text(hit.id) or '')[:90]!r}")
    summary = {
        "train_steps": args.train_steps or "recipe",
        "sts_b_test": scores,
        "index": str(index_path),
        "index_model": index_model,
        "index_documents": index.metadata.count,
        "index_dtype": index.metadata.dtype,
        "minutes": (time.perf_counter() - start) / 60,
        "minutes_by_step": steps,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['minutes']:.1f} min; summary in {out / 'demo_summary.json'}")


if __name__ == "__main__":
    main()
