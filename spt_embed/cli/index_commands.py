"""`spt-embed index`, `search` and `index-merge`: argument parsers and thin run functions."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from spt_embed.cli.options import MODEL_HELP, add_backend_argument, add_dtype_argument
from spt_embed.retrieval.corpus import CorpusFormat
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.metadata import DEFAULT_BLOCK_SIZE, OnDuplicate, ShardMetadata, read_metadata
from spt_embed.retrieval.precision import DEFAULT_RESCORE_MULTIPLIER, Precision

PRECISION_HELP = (
    "how document vectors are stored: float32 (4 bytes per dimension, exact), int8 (1 byte, per-dimension ranges "
    "calibrated on a sample of the corpus), binary (1 bit, the sign; Hamming search) or binary-int8 (binary in "
    "memory, candidates rescored from an int8 copy memory-mapped from disk); all but float32 need --index-type "
    "flat or hnsw"
)
RESCORE_HELP = (
    "int8/binary/binary-int8: fetch k times this many candidates and rescore them with the float query "
    "(0: no rescoring)"
)

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
_RAY_OPTIONS = {"address": None, "num_workers": None, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0}


def add_index_parsers(subparsers) -> None:
    """Add the three subcommands to the `spt-embed` subparsers; each sets `func` to its run function."""
    presets = ", ".join(t.value for t in IndexType)
    duplicates = [p.value for p in OnDuplicate]
    precisions = [p.value for p in Precision]

    idx = subparsers.add_parser(
        "index",
        help="encode a corpus file into a FAISS index folder (or one shard of it)",
        description="Encode a corpus (jsonl with _id/id, title, text as BEIR; parquet with those columns; csv/tsv "
        "with a header; or plain text, one document per line, id = line number) into a FAISS index folder. Large "
        "corpora: run --shard i/N jobs anywhere, then `spt-embed index-merge`, or encode on a Ray cluster with "
        "--engine ray. A killed job rerun with the same command resumes.",
    )
    idx.add_argument("--model", required=True, help=MODEL_HELP)
    idx.add_argument("--corpus", required=True, help="corpus: .jsonl, .parquet, .csv, .tsv, else one doc per line")
    idx.add_argument("--output", required=True, help="index folder to write (with --shard: the shard folder)")
    idx.add_argument(
        "--index-type",
        default=IndexType.FLAT.value,
        help=f"preset ({presets}) or a FAISS factory string, e.g. 'IVF1024,PQ64' (default: flat, exact)",
    )
    idx.add_argument("--precision", choices=precisions, default=Precision.FLOAT32.value, help=PRECISION_HELP)
    idx.add_argument(
        "--rescore-multiplier", type=int, default=DEFAULT_RESCORE_MULTIPLIER,
        help=f"{RESCORE_HELP}; recorded as the index's search default (default: {DEFAULT_RESCORE_MULTIPLIER})",
    )
    idx.add_argument("--query-prompt", default=None, help="instruction prepended to queries at search time (not docs)")
    idx.add_argument("--format", choices=[f.value for f in CorpusFormat], default=None, help="default: from the suffix")
    idx.add_argument("--id-field", default=None, help="id field/column (default: _id, then id)")
    idx.add_argument("--text-field", default="text", help="text field/column (default: text)")
    idx.add_argument("--title-field", default="title", help="title joined before the text if present; '' for none")
    idx.add_argument("--skip-bad-lines", action="store_true", help="log and skip unreadable records (default: stop)")
    idx.add_argument("--on-duplicate", choices=duplicates, default=OnDuplicate.ERROR.value, help="a repeated id")
    idx.add_argument("--shard", default=None, help="i/N: encode only records r with r %% N == i, into a shard folder")
    idx.add_argument("--batch-size", type=int, default=32)
    add_dtype_argument(idx)
    add_backend_argument(idx)
    idx.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="documents per saved part (resume granularity)"
    )
    idx.add_argument("--overwrite", action="store_true", help="replace the output (a shard folder: start it afresh)")
    idx.add_argument(
        "--keep-parts", action="store_true",
        help="keep OUTPUT.parts/ (--engine ray: OUTPUT.parquet/), the encoded blocks, after indexing",
    )
    ray_group = idx.add_argument_group(
        "Ray", "encode with Ray Data actors on a Ray cluster (pip install 'spt-embed[ray]')"
    )
    ray_group.add_argument(
        "--engine", choices=ENGINES, default="local",
        help="local: this process (default); ray: an actor pool on a Ray cluster, blocks saved as parquet",
    )
    ray_group.add_argument(
        "--address", default=None,
        help="Ray cluster: auto (the one this machine is part of), HOST:PORT or ray://HOST:10001 (default: that of "
        "auto if there is one, else a new local Ray)",
    )
    ray_group.add_argument("--num-workers", type=int, default=None, help="encoder actors (default: as many as fit)")
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray_group.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor; >0 encodes on CUDA")
    idx.set_defaults(func=run_index)

    sea = subparsers.add_parser("search", help="search an index folder with query texts")
    sea.add_argument("--index", required=True, help="index folder written by `spt-embed index` or `index-merge`")
    queries = sea.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", action="append", help="a query text (repeat for several)")
    queries.add_argument("--queries", help="file of queries: one per line (blank lines skipped) or jsonl with text")
    sea.add_argument("--top-k", type=int, default=10, help="hits per query (clamped to the index size)")
    sea.add_argument("--rescore-multiplier", type=int, default=None, help=f"{RESCORE_HELP} (default: the index's)")
    sea.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: the one recorded in the index)")
    sea.add_argument("--corpus", default=None, help="corpus file for snippets if it moved (default: the recorded one)")
    sea.add_argument("--snippet-chars", type=int, default=100, help="characters of document text shown; 0: none")
    sea.add_argument("--json", action="store_true", help="one JSON line per query instead of a table")
    sea.set_defaults(func=run_search)

    mer = subparsers.add_parser(
        "index-merge",
        help="combine complete shard folders into one index folder",
        description="Check that the shards come from one model and query prompt and form complete sets "
        "(0/N ... N-1/N per corpus file), report ids found in more than one shard, and build one index. IVF types "
        "(ivfpq, IVF<n>,Flat / PQ / SQ factory strings) are trained once on a sample, built shard by shard and "
        "merged with their inverted lists on disk (OUTPUT/index.ivfdata, memory-mapped at search time); flat and "
        "hnsw are built in memory.",
    )
    mer.add_argument("shards", nargs="+", help="shard folders written by `spt-embed index --shard i/N`")
    mer.add_argument("--output", required=True, help="index folder to write")
    mer.add_argument(
        "--index-type", default=None,
        help=f"{presets} or a factory string (default: the shards' own); IVF types merge on disk",
    )
    mer.add_argument(
        "--precision", choices=precisions, default=None, help=f"{PRECISION_HELP} (default: the shards' own)"
    )
    mer.add_argument("--rescore-multiplier", type=int, default=None, help=f"{RESCORE_HELP} (default: the shards' own)")
    mer.add_argument("--on-duplicate", choices=duplicates, default=OnDuplicate.ERROR.value, help="an id in two shards")
    mer.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    mer.set_defaults(func=run_index_merge)


def run_index(args: argparse.Namespace) -> None:
    options = dict(
        index_type=args.index_type,
        precision=args.precision,
        rescore_multiplier=args.rescore_multiplier,
        batch_size=args.batch_size,
        block_size=args.block_size,
        query_prompt=args.query_prompt,
        corpus_format=args.format,
        id_field=args.id_field,
        text_field=args.text_field,
        title_field=args.title_field or None,
        skip_bad_lines=args.skip_bad_lines,
        on_duplicate=args.on_duplicate,
        overwrite=args.overwrite,
        keep_parts=args.keep_parts,
        dtype=args.dtype,
    )
    ray_options = {name: getattr(args, name) for name in _RAY_OPTIONS}
    if args.engine == "ray":
        if args.shard is not None:
            raise ValueError("--shard splits the work by hand; --engine ray spreads it over the cluster: use one.")
        if args.backend != "torch":
            raise ValueError(f"--backend {args.backend} applies to --engine local; Ray workers encode with torch.")
        from spt_embed.retrieval.ray_encoding import index_corpus_ray

        output = index_corpus_ray(args.model, args.corpus, args.output, **options, **ray_options)
    else:
        given = [name for name, default in _RAY_OPTIONS.items() if ray_options[name] != default]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} only apply to --engine ray.")
        from spt_embed.retrieval.indexing import index_corpus

        output = index_corpus(args.model, args.corpus, args.output, shard=args.shard, backend=args.backend, **options)
    if args.shard is not None:
        meta = ShardMetadata.load(output)
        print(f"shard {meta.shard}: {meta.count} documents in {output}; merge all shards with `spt-embed index-merge`")
    else:
        meta = read_metadata(output)
        print(f"wrote {output}: {meta.count} documents, {meta.factory}, dimension {meta.dimension}, "
              f"{_storage(meta.precision, meta.bytes_per_vector, meta.rescore_multiplier)}{_on_disk(meta)}")


def run_index_merge(args: argparse.Namespace) -> None:
    from spt_embed.retrieval.indexing import merge_shards

    index = merge_shards(args.shards, args.output, index_type=args.index_type, precision=args.precision,
                         rescore_multiplier=args.rescore_multiplier, on_duplicate=args.on_duplicate,
                         overwrite=args.overwrite)
    print(f"wrote {args.output}: {len(index)} documents from {len(args.shards)} shard(s), {index.metadata.factory}, "
          f"{_storage(index.metadata.precision, index.bytes_per_vector, index.metadata.rescore_multiplier)}"
          f"{_on_disk(index.metadata)}")


def _on_disk(meta) -> str:
    return f", inverted lists on disk in {meta.ivfdata} (memory-mapped)" if meta.ivfdata else ""


def _storage(precision: str, size: int | None, rescore_multiplier: int) -> str:
    """'int8, 384 bytes per vector, rescoring 4x candidates': how an index stores and searches its vectors."""
    text = f"{precision}, {'unknown' if size is None else size} bytes per vector"
    if precision == Precision.BINARY_INT8.value:
        text += " in memory (+ an int8 copy on disk)"
    if precision != Precision.FLOAT32.value:
        text += f", rescoring {rescore_multiplier}x candidates" if rescore_multiplier else ", no rescoring"
    return text


def run_search(args: argparse.Namespace) -> None:
    from spt_embed.retrieval.index import load_index

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}.")
    index = load_index(args.index)
    if args.model is not None:
        from spt_embed.model.encoder import open_encoder

        # Checked against the index's fingerprint and dimension.
        index.model = open_encoder(args.model, dtype=index.metadata.dtype, backend=index.metadata.backend)
    if args.corpus is not None:
        if index.metadata.corpus is None:
            raise ValueError(f"{args.index} records no corpus layout (merged from several files): no snippets.")
        index.metadata.corpus = {**index.metadata.corpus, "path": str(Path(args.corpus).expanduser().resolve())}
    query_ids, texts = _queries(args)
    results = index.search(texts, k=args.top_k, rescore_multiplier=args.rescore_multiplier)
    if not args.json:
        multiplier = index.metadata.rescore_multiplier if args.rescore_multiplier is None else args.rescore_multiplier
        storage = _storage(index.metadata.precision, index.bytes_per_vector, multiplier)
        print(f"index {args.index}: {len(index)} documents, {index.metadata.factory}, {storage}")
    for query_id, text, hits in zip(query_ids, texts, results):
        snippets = [_snippet(index.document_text(hit.id), args.snippet_chars) for hit in hits]
        if args.json:
            rows = [{"rank": r, "id": h.id, "score": round(h.score, 6), "text": s} for r, (h, s) in
                    enumerate(zip(hits, snippets), start=1)]
            print(json.dumps({"query_id": query_id, "query": text, "hits": rows}, ensure_ascii=False))
            continue
        print(f"\nquery {query_id}: {text}")
        width = max((len(hit.id) for hit in hits), default=0)
        for rank, (hit, snippet) in enumerate(zip(hits, snippets), start=1):
            print(f"  {rank:>3}  {hit.score:7.4f}  {hit.id:<{width}}  {snippet or ''}".rstrip())


def _queries(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.query is not None:
        return [str(i) for i in range(1, len(args.query) + 1)], list(args.query)
    from spt_embed.retrieval.corpus import CorpusSpec, iter_documents

    documents = list(iter_documents(CorpusSpec(args.queries, title_field=None)))
    empty = [d.line for d in documents if not d.text]
    if empty:
        logger.warning("%s: skipped %d empty quer(ies) on line(s) %s", args.queries, len(empty), empty[:20])
        documents = [d for d in documents if d.text]
    if not documents:
        raise ValueError(f"{args.queries} contains no queries.")
    return [d.id for d in documents], [d.text for d in documents]


def _snippet(text: str | None, chars: int) -> str | None:
    if text is None or chars <= 0:
        return None
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= chars else flat[: chars - 3] + "..."
