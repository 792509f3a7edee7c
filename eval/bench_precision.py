"""SciFact test with compressed document vectors: nDCG@10 and bytes per vector for float32, int8, binary and
binary-int8 (binary in memory, rescored from an int8 copy on disk).

    python eval/bench_precision.py --model all-minilm-l6-v2       # updates eval/results/bench_precision.json
    python eval/bench_precision.py --model smollm2-135m-nli
    python eval/bench_precision.py --model smollm2-135m-nli --from-index DIR    # DIR: a float32 index of that model
    python eval/bench_precision.py --model all-minilm-l6-v2 --limit-docs 200 --results /tmp/smoke.json   # smoke run

1. The document embeddings (float32, unit length) are encoded once and cached in `--cache-dir` (default
   out/bench_precision/) under the model fingerprint, dtype and number of documents, with a sidecar .json holding
   the ids and a sha256 of the documents; a rerun on the same documents loads them instead of encoding.
   `--from-index DIR` takes them from an existing float32 index folder of the same model (faiss reconstruct_n),
   e.g. the flat index eval/faiss_retrieval.py leaves in out/faiss_retrieval/scifact-<model>.index.
2. From those vectors one index per precision is built as `spt-embed index --precision ...` builds it
   (`--index-type` flat by default; int8 calibrated on a seeded sample), and the 300 test queries are searched
   with and without rescoring (`--rescore-multiplier`). nDCG@10 is computed by pytrec_eval as
   eval/faiss_retrieval.py does (its readers are reused); recall@10 is measured against the float32 index.

3. `--select-multiplier 4 8 16 32` chooses the rescore multiplier of int8 and binary on SciFact's *train* claims
   (qrels/train.tsv, the same corpus; never on the test queries): each candidate's nDCG@10 on the train claims is
   recorded, and the best one (the smallest on a tie) gets its own test row, marked `selected_on: train`.

`--limit-docs N` indexes the first N documents only (a smoke run): its scores are not SciFact's, and its results
entry is marked with the limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from faiss_retrieval import ndcg_at_10, read_split, to_run  # eval/ is the script's folder
from spt_embed.cli.options import add_dtype_argument
from spt_embed.datafiles import data_root
from spt_embed.model.dtypes import weights_dtype
from spt_embed.model.encoder import open_encoder
from spt_embed.model.identity import model_fingerprint, prompt_routes
from spt_embed.retrieval.corpus import CorpusSpec, iter_documents
from spt_embed.retrieval.index import index_from_embeddings, load_index
from spt_embed.retrieval.metadata import IndexMetadata, read_metadata
from spt_embed.retrieval.precision import DEFAULT_RESCORE_MULTIPLIER, Precision
from spt_embed.retrieval.shards import block_digest, encode_block

logger = logging.getLogger("bench_precision")
K = 10


def corpus_documents(folder: Path, limit: int | None) -> list:
    """The corpus documents with text, in file order (the first `limit` of them if given)."""
    documents = [d for d in iter_documents(CorpusSpec(folder / "corpus.jsonl")) if d.text.strip()]
    return documents[:limit] if limit else documents


def cached_embeddings(model, documents: list, cache_dir: Path, batch_size: int) -> tuple[np.ndarray, str]:
    """(len(documents), dimension) float32 document embeddings: from the cache if it holds these documents,
    else encoded (longest first, as `spt-embed index` does) and cached."""
    fingerprint, _ = model_fingerprint(model)
    stem = f"scifact-{fingerprint}-{weights_dtype(model)}-{len(documents)}docs"
    vectors_file, sidecar = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    digest = block_digest(documents)
    if vectors_file.is_file() and sidecar.is_file():
        if json.loads(sidecar.read_text(encoding="utf-8")).get("digest") == digest:
            logger.info("Document embeddings from %s", vectors_file)
            return np.load(vectors_file), f"cache {vectors_file}"
        logger.warning("%s holds other documents (the corpus changed?); encoding afresh.", vectors_file)
    with tqdm(total=len(documents), unit="doc", desc="encode corpus") as bar:
        vectors = encode_block(model, [d.text for d in documents], batch_size, bar)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(vectors_file, vectors)
    sidecar.write_text(json.dumps({"digest": digest, "ids": [d.id for d in documents]}) + "\n", encoding="utf-8")
    logger.info("Cached the document embeddings in %s", vectors_file)
    return vectors, "encoded"


def index_embeddings(folder: Path, model, limit: int | None) -> tuple[np.ndarray, list[str]]:
    """The float32 vectors and ids of an index folder built by the same model (its first `limit` rows if given)."""
    index = load_index(folder, model=model)  # refuses an index of another model
    if index.metadata.precision != Precision.FLOAT32.value:
        raise ValueError(f"{folder} stores {index.metadata.precision} vectors; --from-index needs a float32 index.")
    count = min(limit, len(index)) if limit else len(index)
    return index.faiss_index.reconstruct_n(0, count), index.ids[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-nli", help="adapter, bundled adapter or ST folder")
    parser.add_argument("--data", default=None, help="BEIR SciFact folder (default: data_root()/beir_scifact)")
    parser.add_argument("--from-index", default=None, help="float32 index folder of the model to take vectors from")
    parser.add_argument("--limit-docs", type=int, default=None, help="index only the first N documents (smoke run)")
    parser.add_argument("--index-type", choices=["flat", "hnsw"], default="flat")
    parser.add_argument("--rescore-multiplier", type=int, default=DEFAULT_RESCORE_MULTIPLIER)
    parser.add_argument("--select-multiplier", type=int, nargs="+", default=None, metavar="M",
                        help="candidate rescore multipliers, chosen per precision on SciFact's train claims")
    parser.add_argument("--query-prompt", default=None, help="instruction prepended to queries")
    parser.add_argument("--batch-size", type=int, default=32)
    add_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the int8 calibration sample")
    parser.add_argument("--cache-dir", default="out/bench_precision", help="where document embeddings are cached")
    parser.add_argument("--results", default="eval/results/bench_precision.json")
    args = parser.parse_args()
    if args.limit_docs is not None and args.limit_docs < 1:
        parser.error(f"--limit-docs must be a positive number of documents, got {args.limit_docs}.")
    if args.rescore_multiplier < 1 or min(args.select_multiplier or [1]) < 1:
        parser.error("rescore multipliers must be at least 1 (rows without rescoring are always measured).")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(args.data) if args.data else data_root() / "beir_scifact"
    if args.from_index:
        recorded = read_metadata(Path(args.from_index))
        if (recorded.dtype, recorded.query_prompt) != (args.dtype, args.query_prompt):
            raise ValueError(
                f"{args.from_index} was encoded in {recorded.dtype} with query prompt {recorded.query_prompt!r}; "
                f"pass --dtype {recorded.dtype} and that --query-prompt."
            )

    model = open_encoder(args.model, dtype=args.dtype)
    corpus_size = len(corpus_documents(folder, None))
    if args.from_index:
        vectors, ids = index_embeddings(Path(args.from_index), model, args.limit_docs)
        source = f"index {args.from_index}"
        if not args.limit_docs and len(ids) != corpus_size:
            raise ValueError(f"{args.from_index} holds {len(ids)} documents, the corpus {corpus_size}: scores on "
                             "part of the corpus are not SciFact's; index all of it (or pass --limit-docs).")
    else:
        documents = corpus_documents(folder, args.limit_docs)
        vectors, source = cached_embeddings(model, documents, Path(args.cache_dir), args.batch_size)
        ids = [d.id for d in documents]
    if len(ids) < corpus_size:
        logger.warning("%d of %d documents: the scores are not SciFact's (a smoke run).", len(ids), corpus_size)

    fingerprint, backbone = model_fingerprint(model)
    base = IndexMetadata(
        fingerprint=fingerprint, dimension=vectors.shape[1], model=args.model, backbone_fingerprint=backbone,
        index_type=args.index_type, query_prompt=args.query_prompt, prompt_routes=prompt_routes(model),
        dtype=weights_dtype(model),
    )
    query_ids, query_texts, qrels = read_split(folder)
    reference = index_from_embeddings(vectors, ids, dataclasses.replace(base), model=model)
    queries = reference.encode_queries(query_texts, batch_size=args.batch_size)
    reference_hits = reference.search(queries, K)
    reference_top = [{hit.id for hit in row} for row in reference_hits]

    if args.select_multiplier:
        train_ids, train_texts, train_qrels = read_split(folder, "train")
        train_queries = reference.encode_queries(train_texts, batch_size=args.batch_size)
    rows, selection = [], {}
    for precision in Precision:
        metadata = dataclasses.replace(base, precision=precision.value)
        index = reference if precision is Precision.FLOAT32 else index_from_embeddings(
            vectors, ids, metadata, seed=args.seed
        )
        multipliers = [None] if precision is Precision.FLOAT32 else [0, args.rescore_multiplier]
        if args.select_multiplier and precision is not Precision.FLOAT32:
            on_train = {m: round(ndcg_at_10(to_run(train_ids, index.search(train_queries, K, rescore_multiplier=m)),
                                            train_qrels), 2) for m in sorted(set(args.select_multiplier))}
            chosen = max(on_train, key=lambda m: (on_train[m], -m))
            selection[precision.value] = {"train_ndcg_at_10": on_train, "chosen": chosen}
            print(f"{precision.value:>11}  train claims nDCG@10 by multiplier {on_train}: chose {chosen}x")
            if chosen not in multipliers:
                multipliers.append(chosen)
        for multiplier in multipliers:
            hits = index.search(queries, K, rescore_multiplier=multiplier)
            recall = np.mean([len({h.id for h in row} & top) / len(top) for row, top in zip(hits, reference_top)])
            rows.append({
                "precision": precision.value, "factory": index.metadata.factory, "rescore_multiplier": multiplier,
                "bytes_per_vector": index.bytes_per_vector,
                **({"rescore_bytes_per_vector_on_disk": index.rescore_bytes_per_vector}
                   if index.rescore_bytes_per_vector else {}),
                "ndcg_at_10": round(ndcg_at_10(to_run(query_ids, hits), qrels), 2),
                "recall_at_10_vs_float32": round(float(recall), 4),
            })
            if selection.get(precision.value, {}).get("chosen") == multiplier:
                rows[-1]["selected_on"] = "train"
            rescoring = "-" if multiplier is None else ("none" if multiplier == 0 else f"{multiplier}x")
            print(f"{precision.value:>11}  rescoring {rescoring:>4}  {index.bytes_per_vector:>5} bytes/vector  "
                  f"nDCG@10 {rows[-1]['ndcg_at_10']:6.2f}  recall@10 vs float32 {recall:.4f}")

    import faiss

    record = {
        "model": args.model, "dtype": base.dtype, "command": "python " + shlex.join(sys.argv),
        "documents": len(ids), "corpus_documents": corpus_size, "queries": len(query_ids),
        "dimension": base.dimension, "fingerprint": fingerprint, "index_type": args.index_type,
        "calibration_seed": args.seed, "vectors_from": source, "rows": rows,
        **({"multiplier_selection": {"split": "train", "queries": len(train_ids), **selection}} if selection else {}),
        "machine": f"{platform.machine()}, faiss {faiss.__version__}",
    }
    key = args.model if base.dtype == "float32" else f"{args.model} ({base.dtype})"
    if args.index_type != "flat":
        key += f" {args.index_type}"
    if len(ids) < corpus_size:
        key += f" [first {len(ids)} documents]"
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    existing[key] = record
    out.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")
    print(f"results for {key} written to {out}")


if __name__ == "__main__":
    main()
