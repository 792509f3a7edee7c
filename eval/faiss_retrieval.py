"""SciFact test through the FAISS path: nDCG@10 of the flat index next to mteb's score, HNSW recall and latency.

    python eval/faiss_retrieval.py --model smollm2-135m-nli        # updates eval/results/faiss_retrieval.json
    python eval/faiss_retrieval.py --model smollm2-135m-nli --dtype bfloat16    # about 2x faster on AVX512-BF16

1. `index_corpus` encodes data/beir_scifact/corpus.jsonl (5,183 docs, title + text as mteb joins them) into a flat
   (exact inner product) index; the 300 test queries are searched with `Index.search`; nDCG@10 is computed by
   pytrec_eval (the implementation mteb uses) on the FAISS rankings. A killed run resumes its encoding when rerun
   (the blocks in INDEX.parts/; `resumed_from_parts` in the results then says that `encode_and_index_s` is partial).
2. mteb's own SciFact evaluation (`mteb.evaluate` on the local task of spt_embed.evaluation.mteb_tasks) runs on the same
   model with its document/query encoders answered from the embeddings of step 1, looked up by exact text: a
   lookup miss (a text mteb builds differently) is encoded afresh and counted. Equal scores and zero misses show
   that the FAISS path (text joining, id mapping, search) reproduces mteb. `--mteb-reencode` lets mteb encode
   everything itself instead (twice the encoding time).
3. An HNSW index is built from the same vectors: recall@10 against the flat results and ms/query (FAISS on
   `--threads` threads, queries one at a time and as one batch) for several efSearch values.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from spt_embed.datafiles import data_root
from spt_embed.cli.options import add_dtype_argument
from spt_embed.model.encoder import open_encoder
from spt_embed.retrieval.corpus import CorpusSpec, iter_documents
from spt_embed.retrieval.index import IndexMetadata, index_from_embeddings, load_index
from spt_embed.retrieval.indexing import index_corpus

logger = logging.getLogger("faiss_retrieval")
EF_SEARCH = (16, 32, 64, 128, 256)


def read_split(folder: Path, split: str = "test") -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """The split's query ids and texts (those with qrels in qrels/<split>.tsv, in file order) and its qrels."""
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels" / f"{split}.tsv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = [d for d in iter_documents(CorpusSpec(folder / "queries.jsonl", title_field=None)) if d.id in qrels]
    return [d.id for d in queries], [d.text for d in queries], qrels


def ndcg_at_10(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> float:
    import pytrec_eval

    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return 100 * float(np.mean([scores[qid]["ndcg_cut_10"] for qid in qrels]))


def to_run(query_ids, hits) -> dict[str, dict[str, float]]:
    return {qid: {hit.id: hit.score for hit in row} for qid, row in zip(query_ids, hits)}


def timed_search(index, vectors: np.ndarray, k: int) -> tuple[list, float, float]:
    """Hits, ms/query with all queries in one call, ms/query one query per call."""
    start = time.perf_counter()
    hits = index.search(vectors, k)
    batched = 1000 * (time.perf_counter() - start) / len(vectors)
    start = time.perf_counter()
    for row in vectors:
        index.search(row[None, :], k)
    single = 1000 * (time.perf_counter() - start) / len(vectors)
    return hits, batched, single


_PROMPT_NAMES = {"document": ("document", "passage", "corpus"), "query": ("query",)}


def effective_prompt(model, kind: str, prompt: str | None) -> str:
    """The text sentence-transformers' encode_<kind> prepends: `prompt`, else the model's own prompt for `kind`."""
    if prompt is not None:
        return prompt
    prompts = getattr(model, "prompts", None) or {}
    return next((prompts[name] for name in _PROMPT_NAMES[kind] if name in prompts), "")


def install_lookup(model, table: dict[tuple[str, str, str], np.ndarray], counts: dict[str, int]) -> None:
    """Answer model.encode_document/encode_query from `table` (kind, prepended prompt, text) -> vector; misses are
    encoded by the real method (and counted)."""
    for kind in ("document", "query"):
        real = getattr(model, f"encode_{kind}")

        def encode(texts, prompt=None, _kind=kind, _real=real, **kwargs):
            texts = [texts] if isinstance(texts, str) else list(texts)
            key = effective_prompt(model, _kind, prompt)
            missing = list(dict.fromkeys(t for t in texts if (_kind, key, t) not in table))
            counts[f"{_kind}_hits"] += len(texts) - len(missing)
            counts[f"{_kind}_misses"] += len(missing)
            if missing:
                kwargs.update(convert_to_numpy=True, convert_to_tensor=False)
                for text, vector in zip(missing, _real(missing, prompt=prompt, **kwargs)):
                    table[(_kind, key, text)] = np.asarray(vector, dtype=np.float32)
            return np.stack([table[(_kind, key, t)] for t in texts])

        setattr(model, f"encode_{kind}", encode)


def mteb_score(model, batch_size: int) -> float:
    import mteb

    from spt_embed.evaluation.mteb_tasks import get_tasks

    outcome = mteb.evaluate(
        model, get_tasks(["SciFact"]), cache=None, co2_tracker=False, encode_kwargs={"batch_size": batch_size}
    )
    return 100 * float(outcome.task_results[0].scores["test"][0]["main_score"])


def resolve_reference(spec: str) -> str:
    """`all-minilm-l6-v2` (the reference encoder packaged on PyPI) to its folder; any other spec as it is."""
    try:
        from spt_embed.model.specs import REFERENCE_ENCODERS, reference_encoder_path
    except ImportError:
        return spec
    return str(reference_encoder_path(spec)) if spec in REFERENCE_ENCODERS else spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-nli", help="adapter, bundled adapter or ST folder")
    parser.add_argument("--data", default=None, help="BEIR SciFact folder (default: data_root()/beir_scifact)")
    parser.add_argument("--index-dir", default=None, help="where the flat index goes (default: out/faiss_retrieval/)")
    parser.add_argument("--reuse-index", action="store_true", help="reuse an index of the same model if there")
    parser.add_argument("--query-prompt", default=None, help="instruction prepended to queries")
    parser.add_argument("--batch-size", type=int, default=32)
    add_dtype_argument(parser)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads for the timings")
    parser.add_argument("--no-mteb", action="store_true", help="skip the mteb comparison")
    parser.add_argument("--mteb-reencode", action="store_true", help="let mteb encode everything itself")
    parser.add_argument("--results", default="eval/results/faiss_retrieval.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from spt_embed.retrieval.faiss_factory import import_faiss

    faiss = import_faiss()  # quiet: no loader INFO lines about missing AVX builds
    folder = Path(args.data) if args.data else data_root() / "beir_scifact"
    name = Path(args.model).name or args.model
    index_dir = Path(args.index_dir) if args.index_dir else Path("out/faiss_retrieval") / f"scifact-{name}.index"
    record: dict = {
        "model": args.model, "dtype": args.dtype, "command": "python " + shlex.join(sys.argv),
        "faiss_threads": args.threads,
    }

    model = open_encoder(resolve_reference(args.model), dtype=args.dtype)
    start = time.perf_counter()
    if not (args.reuse_index and index_dir.exists()):
        # A killed run left its encoded blocks in INDEX.parts/: index_corpus resumes them, and the time below then
        # covers only the rest, so the record says so.
        record["resumed_from_parts"] = (index_dir.parent / f"{index_dir.name}.parts").exists()
        index_corpus(model, folder / "corpus.jsonl", index_dir, index_type="flat", batch_size=args.batch_size,
                     query_prompt=args.query_prompt, overwrite=True, model_spec=args.model)
        record["encode_and_index_s"] = round(time.perf_counter() - start, 1)
    flat = load_index(index_dir, model=model)  # refuses an index of another model
    if flat.metadata.dtype != args.dtype:
        raise ValueError(f"{index_dir} was encoded in {flat.metadata.dtype}; drop --reuse-index or pass that --dtype.")
    if flat.metadata.query_prompt != args.query_prompt:
        raise ValueError(f"{index_dir} was built with query prompt {flat.metadata.query_prompt!r}; drop --reuse-index.")
    corpus_size = sum(1 for line in (folder / "corpus.jsonl").open(encoding="utf-8") if line.strip())
    if len(flat) != corpus_size:  # e.g. `make demo` indexes only the first 400 documents by default
        raise ValueError(f"{index_dir} holds {len(flat)} documents, the corpus {corpus_size}: scores on part of the "
                         "corpus are not SciFact's; drop --reuse-index, or index all of it (eval/demo.py --index-docs 0).")
    query_ids, query_texts, qrels = read_split(folder)
    start = time.perf_counter()
    query_vectors = flat.encode_queries(query_texts, batch_size=args.batch_size)
    record["encode_queries_s"] = round(time.perf_counter() - start, 1)
    # Only now: FAISS and torch share one OpenMP runtime, so setting FAISS's threads before the encoding would have
    # run the encoder on --threads threads too (seen with --threads 1: load average 1.0 on this 2-core machine).
    faiss.omp_set_num_threads(args.threads)
    flat_hits, flat_batched, flat_single = timed_search(flat, query_vectors, 10)
    record.update(
        documents=len(flat),
        queries=len(query_ids),
        dimension=flat.metadata.dimension,
        fingerprint=flat.metadata.fingerprint,
        ndcg_at_10_faiss_flat=round(ndcg_at_10(to_run(query_ids, flat_hits), qrels), 2),
        flat_ms_per_query={"batched": round(flat_batched, 3), "single": round(flat_single, 3)},
    )
    print(f"SciFact test nDCG@10 (FAISS flat): {record['ndcg_at_10_faiss_flat']:.2f}")

    vectors = flat.faiss_index.reconstruct_n(0, len(flat))
    meta = IndexMetadata(**{**vars(flat.metadata), "index_type": "hnsw", "corpus": None})
    start = time.perf_counter()
    hnsw = index_from_embeddings(vectors, flat.ids, meta)
    record["hnsw_build_s"] = round(time.perf_counter() - start, 2)
    record["hnsw"] = []
    flat_top = [{hit.id for hit in row} for row in flat_hits]
    for ef in EF_SEARCH:
        faiss.downcast_index(hnsw.faiss_index).hnsw.efSearch = ef
        hits, batched, single = timed_search(hnsw, query_vectors, 10)
        recall = np.mean([len({h.id for h in row} & top) / len(top) for row, top in zip(hits, flat_top)])
        record["hnsw"].append({
            "factory": hnsw.metadata.factory, "efSearch": ef, "recall_at_10_vs_flat": round(float(recall), 4),
            "ndcg_at_10": round(ndcg_at_10(to_run(query_ids, hits), qrels), 2),
            "ms_per_query": {"batched": round(batched, 3), "single": round(single, 3)},
        })
        print(f"HNSW32 efSearch={ef}: recall@10 vs flat {recall:.4f}, {single:.3f} ms/query (single)")

    if not args.no_mteb:
        counts = {"document_hits": 0, "document_misses": 0, "query_hits": 0, "query_misses": 0}
        if not args.mteb_reencode:
            query_prompt = effective_prompt(model, "query", args.query_prompt)
            table = {("query", query_prompt, t): v for t, v in zip(query_texts, query_vectors)}
            position = {doc_id: i for i, doc_id in enumerate(flat.ids)}
            document_prompt = effective_prompt(model, "document", None)
            for document in iter_documents(CorpusSpec(**flat.metadata.corpus)):
                table[("document", document_prompt, document.text)] = vectors[position[document.id]]
            install_lookup(model, table, counts)
            record["mteb_lookup"] = counts
        if args.query_prompt is not None:
            logger.warning("mteb applies no --query-prompt: its score is for queries without it.")
        record["ndcg_at_10_mteb"] = round(mteb_score(model, args.batch_size), 2)
        record["mteb_minus_faiss"] = round(record["ndcg_at_10_mteb"] - record["ndcg_at_10_faiss_flat"], 2)
        print(f"SciFact test nDCG@10 (mteb): {record['ndcg_at_10_mteb']:.2f}   lookups: {counts}")

    record["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, faiss {faiss.__version__}"
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    existing[args.model if args.dtype == "float32" else f"{args.model} ({args.dtype})"] = record
    out.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")
    print(f"results for {args.model} written to {out}")


if __name__ == "__main__":
    main()
