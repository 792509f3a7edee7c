"""Encoding speed and fidelity of every CPU form of one encoder: the adapter (float32, bfloat16), its plain export in
PyTorch, ONNX Runtime (float32, int8) and OpenVINO (float32, int8) through sentence-transformers' own backends
(`spt_embed.export(..., backend=..., quantize=...)`), and all-MiniLM-L6-v2 for reference.

    python eval/bench_encode.py             # the bundled smollm2-135m-nli; writes eval/results/bench_encode.json
    python eval/bench_encode.py --smoke     # a tiny random model and a few texts: checks the script in a minute

On the same texts (both sentences of every STS-B test pair; the first `--docs` SciFact documents, title + text as
mteb joins them), for each form: texts/s of `model.encode` (batch 32, after a warm-up batch), the cosine of each
text's embedding to the float32 adapter's (min and mean; none for all-MiniLM-L6-v2, another model), and the STS-B
test Spearman correlation of the pair cosines with the gold scores. Exports go to a temporary folder, each removed
after its row. A form whose packages are missing (`pip install 'spt-embed[onnx]'`, `'spt-embed[openvino]'`) is
recorded as skipped with the reason; one that fails otherwise is recorded as failed, and the run goes on. PyTorch
runs on `torch.get_num_threads()` threads, ONNX Runtime and OpenVINO on their own default (every core). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed.hardware import cpu_summary, package_versions
from spt_embed.datafiles import load_sts, scifact_documents
from spt_embed.model.encoder import open_encoder

REFERENCE = "adapter-fp32"
REFERENCE_ENCODER = "all-minilm-l6-v2"
# form -> (export backend, quantize); the other forms load the adapter or the reference encoder directly.
EXPORTS = {
    "export-torch": ("torch", None),
    "onnx-fp32": ("onnx", None),
    "onnx-int8": ("onnx", "int8"),
    "openvino-fp32": ("openvino", None),
    "openvino-int8": ("openvino", "int8"),
}
FORMS = (REFERENCE, "adapter-bf16", *EXPORTS, REFERENCE_ENCODER)
BATCH = 32
# The packages whose versions a run records (the openvino extra pins an older transformers than the core install).
VERSIONED = ("transformers", "sentence-transformers", "openvino", "optimum-intel", "nncf", "onnxruntime")

logger = logging.getLogger("bench_encode")


def tiny_adapter(folder: Path, texts: list[str]) -> Path:
    """A tiny random Llama with a word-level tokenizer over the texts' words, built as tests/conftest.py builds its
    backbones, and a suffix adapter on it whose soft tokens differ from their initialisation (as after training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = [word for word, _ in Counter(w for text in texts for w in text.split()).most_common(2000)]
    vocab = {token: index for index, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(0)
    backbone = folder / "backbone"
    LlamaModel(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    model = spt_embed.SuffixPromptEncoder.from_backbone(backbone, num_tokens=4, device="cpu")
    with torch.no_grad():
        model.prompt_module.soft_prompt.add_(torch.randn_like(model.prompt_module.soft_prompt) * 0.5)
    model.max_seq_length = 256
    model.save(str(folder / "adapter"))
    return folder / "adapter"


def open_form(form: str, adapter: str, work: Path) -> tuple[SentenceTransformer, dict]:
    """The encoder of one form, and what building it cost (export seconds, model file size)."""
    if form == REFERENCE:
        return spt_embed.load(adapter), {}
    if form == "adapter-bf16":
        return spt_embed.load(adapter, dtype="bfloat16"), {}
    if form == REFERENCE_ENCODER:
        return open_encoder(REFERENCE_ENCODER), {}
    backend, quantize = EXPORTS[form]
    start = time.perf_counter()
    folder = spt_embed.export(adapter, work / form, backend=backend, quantize=quantize)
    built = {"export_s": round(time.perf_counter() - start, 1)}
    record = json.loads((folder / "spt_export.json").read_text(encoding="utf-8"))
    model_file = folder / record.get("backend_file", "model.safetensors")
    weights = [model_file, model_file.with_suffix(".bin")] if backend == "openvino" else [model_file]
    built["model_mb"] = round(sum(f.stat().st_size for f in weights if f.is_file()) / 2**20, 1)
    if record.get("quantization"):
        built["quantization"] = record["quantization"]
    return SentenceTransformer(str(folder), backend=backend, device="cpu"), built


def timed_encode(model: SentenceTransformer, texts: list[str]) -> tuple[np.ndarray, float]:
    model.encode(texts[:BATCH], batch_size=BATCH)  # warm-up
    start = time.perf_counter()
    embeddings = model.encode(texts, batch_size=BATCH, convert_to_numpy=True)
    return embeddings.astype(np.float32), len(texts) / (time.perf_counter() - start)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-nli", help="adapter folder or bundled adapter name")
    parser.add_argument("--pairs", type=int, default=None, help="STS-B test pairs to use (default: all)")
    parser.add_argument("--docs", type=int, default=512, help="SciFact documents to use (default 512)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help=f"forms to run; {REFERENCE} always runs")
    parser.add_argument("--smoke", action="store_true", help="a tiny random adapter, 64 pairs and 16 documents")
    parser.add_argument("--out", default=None, help="JSON to write (default eval/results/bench_encode.json; "
                        "with --smoke out/bench_encode_smoke.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pairs, docs = (args.pairs or 64, min(args.docs, 16)) if args.smoke else (args.pairs, args.docs)
    first, second, gold = load_sts("test")
    first, second, gold = first[:pairs], second[:pairs], gold[:pairs]
    sets = {"stsb_test": first + second, "scifact_docs": scifact_documents(docs)}
    out = Path(args.out or ("out/bench_encode_smoke.json" if args.smoke else "eval/results/bench_encode.json"))
    forms = [REFERENCE, *(form for form in FORMS if form in args.forms and form != REFERENCE)]

    work = Path(tempfile.mkdtemp(prefix="bench_encode-"))
    try:
        adapter = str(tiny_adapter(work, [t for texts in sets.values() for t in texts])) if args.smoke else args.model
        record: dict = {
            "model": "tiny random llama (--smoke)" if args.smoke else args.model,
            "torch": torch.__version__,
            "versions": package_versions(VERSIONED),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), **cpu_summary(),
            "batch_size": BATCH,
            "texts": {name: len(texts) for name, texts in sets.items()},
            "forms": {},
        }
        reference: dict[str, np.ndarray] = {}
        for form in forms:
            logger.info("form %s", form)
            try:
                model, entry = open_form(form, adapter, work)
            except ImportError as exc:
                record["forms"][form] = {"status": "skipped", "reason": str(exc)}
                continue
            except Exception as exc:  # one backend failing must not lose the other rows
                traceback.print_exc()
                record["forms"][form] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                continue
            entry = {"status": "ok", **entry}
            for name, texts in sets.items():
                embeddings, speed = timed_encode(model, texts)
                result = {"texts_per_s": round(speed, 2)}
                if form == REFERENCE:
                    reference[name] = unit(embeddings)
                if form != REFERENCE_ENCODER and embeddings.shape == reference[name].shape:
                    cosines = (unit(embeddings) * reference[name]).sum(axis=1)
                    result.update(cosine_min=round(float(cosines.min()), 5), cosine_mean=round(float(cosines.mean()), 5))
                if name == "stsb_test":
                    pair = unit(embeddings)
                    predicted = (pair[: len(first)] * pair[len(first) :]).sum(axis=1)
                    entry["stsb_spearman"] = round(float(spearmanr(predicted, gold).statistic), 4)
                entry[name] = result
            record["forms"][form] = entry
            del model
            shutil.rmtree(work / form, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(table(record))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


def table(record: dict) -> str:
    """The record as a markdown table, one row per form."""
    sets = list(record["texts"])
    head = ["form", "STS-B ρ", *(f"{name} texts/s" for name in sets), *(f"{name} cos min / mean" for name in sets),
            "model MB", "export s"]
    lines = [f"Model: {record['model']}; texts: " + ", ".join(f"{n} {name}" for name, n in record["texts"].items()), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for form, entry in record["forms"].items():
        if entry["status"] != "ok":
            lines.append(f"| {form} | {entry['status']}: {entry['reason']} |" + " |" * (len(head) - 2))
            continue
        cells = [form, f"{entry['stsb_spearman']:.4f}"]
        cells += [f"{entry[name]['texts_per_s']:.1f}" for name in sets]
        cells += [f"{entry[name]['cosine_min']:.4f} / {entry[name]['cosine_mean']:.4f}" if "cosine_min" in entry[name]
                  else "n/a (another model)" for name in sets]
        cells += [str(entry.get("model_mb", "")), str(entry.get("export_s", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
