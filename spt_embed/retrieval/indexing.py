"""Corpus file to index folder: sharded encoding (spt_embed.retrieval.shards), then a merge into one FAISS index.

``index_corpus`` encodes a corpus file into an index folder (or, with ``shard="i/N"``, into one shard folder).
``merge_shards`` (CLI ``index-merge``) checks that the shards come from one model, query prompt and a complete set
i = 0..N-1, reports ids found in more than one shard, and builds the index part by part.

Beyond one machine: run the N shard jobs anywhere (a batch scheduler, one job per GPU or node) on the same corpus
file, copy the shard folders to one machine and merge there. Only the merge needs all embeddings in one place
(for flat/hnsw it holds them in memory; ivfpq keeps ~64 bytes per document).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spt_embed.recipe import enum_text, parse_enum
from spt_embed.retrieval.corpus import CorpusSpec, Shard, iter_documents
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.index import Index
from spt_embed.retrieval.metadata import DEFAULT_BLOCK_SIZE, META_FILE, SHARD_FILE, OnDuplicate, ShardMetadata
from spt_embed.retrieval.precision import (
    DEFAULT_RESCORE_MULTIPLIER,
    Precision,
    add_vectors,
    check_precision,
    check_rescore_multiplier,
    new_index,
)
from spt_embed.retrieval.shards import MAX_REPORTED_DUPLICATES, CorpusChangedError, encode_shard, list_parts

logger = logging.getLogger(__name__)


def merge_shards(
    shard_dirs: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    index_type: str | None = None,
    precision: Precision | str | None = None,
    rescore_multiplier: int | None = None,
    on_duplicate: OnDuplicate | str = OnDuplicate.ERROR,
    overwrite: bool = False,
    model=None,
    seed: int = 0,
) -> Index:
    """One index from complete shard folders (all from one model and query prompt); saved at `output`.

    `index_type`, `precision` and `rescore_multiplier` default to the ones the shards were made for."""
    shards = [(Path(folder), ShardMetadata.load(Path(folder))) for folder in shard_dirs]
    if not shards:
        raise ValueError("No shard folders given; pass the folders written by `spt-embed index --shard i/N`.")
    for folder, meta in shards:
        if not meta.complete:
            raise ValueError(
                f"{folder} (shard {meta.shard}) is incomplete: rerun its `spt-embed index --shard {meta.shard} ...` "
                f"command to finish it (finished parts are kept)."
            )
    first_folder, first = shards[0]
    for folder, meta in shards[1:]:
        first.index_metadata("").check_same_model(meta.index_metadata(""), str(first_folder), str(folder))
    _check_complete_sets(shards)
    shards.sort(key=lambda item: (item[1].corpus["path"], Shard.parse(item[1].shard).index))
    if index_type is None:
        types = {meta.index_type for _, meta in shards}
        if len(types) > 1:
            raise ValueError(f"The shards were made for index types {sorted(types)}; choose one with --index-type.")
        index_type = types.pop()
    precision = _shards_choice(shards, "precision", precision, "--precision")
    rescore_multiplier = _shards_choice(shards, "rescore_multiplier", rescore_multiplier, "--rescore-multiplier")
    precision = check_precision(precision, index_type)
    check_rescore_multiplier(rescore_multiplier)

    parts = [part for folder, _ in shards for part in list_parts(folder)]
    masks, ids = _dedupe_parts(parts, parse_enum(OnDuplicate, on_duplicate, "on_duplicate"))
    skipped_empty = sum(meta.skipped_empty for _, meta in shards)
    if not ids:
        empty = f"; {skipped_empty} document(s) with no text were skipped" if skipped_empty else ""
        raise ValueError(f"The shards hold no documents ({', '.join(str(f) for f, _ in shards)}{empty}).")
    sizes = [int(mask.sum()) for mask in masks]
    rng = np.random.default_rng(seed)
    metadata = first.index_metadata(enum_text(index_type))
    metadata.precision, metadata.rescore_multiplier, metadata.skipped_empty = (
        precision.value, rescore_multiplier, skipped_empty
    )
    faiss_index, ranges = new_index(metadata, len(ids), lambda n: _sample(parts, masks, sizes, n, rng), seed)
    for part, mask in zip(tqdm(parts, desc="add to index", unit="part", disable=len(parts) < 2), masks):
        add_vectors(faiss_index, precision, np.load(part)["embeddings"][mask], ranges)
    corpora = {json.dumps(meta.corpus, sort_keys=True) for _, meta in shards}
    offsets = None
    if len(corpora) == 1:
        offsets = np.concatenate([np.load(part)["offsets"][mask] for part, mask in zip(parts, masks)])
    if offsets is None:
        metadata.corpus = None  # documents from several files: no single file to show snippets from
    index = Index(faiss_index, ids, metadata, model=model, offsets=offsets, ranges=ranges)
    index.save(output, overwrite=overwrite)
    logger.info(
        "Wrote %s: %d documents, %s, %s (%s bytes per vector), from %d shard(s).", output, len(index),
        metadata.factory, precision.value, index.bytes_per_vector, len(shards),
    )
    return index


def _shards_choice(shards: list[tuple[Path, ShardMetadata]], name: str, given, flag: str):
    """`given` if not None, else the value of `name` the shards agree on."""
    if given is not None:
        return given
    values = {getattr(meta, name) for _, meta in shards}
    if len(values) > 1:
        raise ValueError(f"The shards were made for {name} {sorted(values)}; choose one with {flag}.")
    return values.pop()


def _check_complete_sets(shards: list[tuple[Path, ShardMetadata]]) -> None:
    """Per corpus file, the shards must be exactly 0/N ... N-1/N (several corpus files may be merged)."""
    groups: dict[str, dict[int, Path]] = {}
    counts: dict[str, set[int]] = {}
    for folder, meta in shards:
        shard, corpus = Shard.parse(meta.shard), meta.corpus["path"]
        counts.setdefault(corpus, set()).add(shard.count)
        given = groups.setdefault(corpus, {})
        if shard.index in given:
            raise ValueError(f"Shard {shard} of {corpus} is given twice: {given[shard.index]} and {folder}.")
        given[shard.index] = folder
    for corpus, given in groups.items():
        if len(counts[corpus]) > 1:
            raise ValueError(f"Shards of {corpus} split it different ways ({sorted(counts[corpus])} shards).")
        count = counts[corpus].pop()
        missing = [f"{i}/{count}" for i in range(count) if i not in given]
        if missing:
            raise ValueError(
                f"Missing shard(s) {', '.join(missing)} of {corpus}; run `spt-embed index --shard i/{count} ...` "
                f"for them and merge all {count}."
            )


def _dedupe_parts(parts: list[Path], policy: OnDuplicate) -> tuple[list[np.ndarray], list[str]]:
    """Keep masks per part and the kept ids in order; every id seen twice is collected before reporting."""
    first_seen: dict[str, Path] = {}
    masks, ids, repeats = [], [], []
    for part in parts:
        part_ids = np.load(part)["ids"].tolist()
        mask = np.ones(len(part_ids), dtype=bool)
        for row, doc_id in enumerate(part_ids):
            if doc_id in first_seen:
                mask[row] = False
                repeats.append(f"{doc_id!r} in {first_seen[doc_id].parent.parent} and {part.parent.parent}")
            else:
                first_seen[doc_id] = part
                ids.append(doc_id)
        masks.append(mask)
    if repeats:
        shown = "; ".join(repeats[:MAX_REPORTED_DUPLICATES])
        more = f" (and {len(repeats) - MAX_REPORTED_DUPLICATES} more)" if len(repeats) > MAX_REPORTED_DUPLICATES else ""
        if policy is OnDuplicate.ERROR:
            raise ValueError(
                f"{len(repeats)} document id(s) appear in more than one shard: {shown}{more}. Make ids unique, or "
                f"keep the first copy with --on-duplicate keep-first."
            )
        logger.warning("Dropped %d duplicate document(s), kept the first copy: %s%s", len(repeats), shown, more)
    return masks, ids


def _sample(parts: list[Path], masks: list[np.ndarray], sizes: list[int], n: int, rng) -> np.ndarray:
    """n random kept rows across all parts, reading one part at a time."""
    total = sum(sizes)
    chosen = np.sort(rng.choice(total, size=n, replace=False))
    rows, start = [], 0
    for part, mask, size in zip(parts, masks, sizes):
        local = chosen[(chosen >= start) & (chosen < start + size)] - start
        if len(local):
            rows.append(np.load(part)["embeddings"][mask][local])
        start += size
    return np.concatenate(rows)


def _model_spec(model: str | os.PathLike) -> str:
    """A bundled adapter name as it is; a path made absolute so that the index can reopen it from anywhere."""
    from spt_embed.model.specs import classify

    return classify(os.fspath(model)).reopenable()


def index_corpus(
    model,
    corpus_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    index_type: str = IndexType.FLAT.value,
    precision: Precision | str = Precision.FLOAT32,
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
    shard: Shard | str | None = None,
    batch_size: int = 32,
    block_size: int = DEFAULT_BLOCK_SIZE,
    query_prompt: str | None = None,
    corpus_format: str | None = None,
    id_field: str | None = None,
    text_field: str = "text",
    title_field: str | None = "title",
    skip_bad_lines: bool = False,
    on_duplicate: OnDuplicate | str = OnDuplicate.ERROR,
    overwrite: bool = False,
    keep_parts: bool = False,
    model_spec: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Encode a corpus file and write an index folder at `output` (or, with `shard`, a shard folder to merge).

    `model`: a model spec (adapter folder, bundled adapter name, SentenceTransformer folder) or a loaded
    SentenceTransformer (then pass `model_spec` for the index to record how to reopen it). Without `shard`, the
    embeddings go to `OUTPUT.parts/` first, so that a killed run resumes; it is removed at the end unless
    `keep_parts`. With `shard`, `overwrite` deletes an existing shard folder instead of resuming it. `dtype`: the
    weights' dtype a model spec is opened in (recorded; search encodes queries in it). `precision`: float32, int8 or
    binary document vectors (int8 and binary with flat or hnsw only; a shard records it for the merge); their
    searches rescore k * `rescore_multiplier` candidates by default.
    """
    # Checked before the model is opened: a refused combination costs no encoding.
    precision = check_precision(precision, index_type)
    check_rescore_multiplier(rescore_multiplier)
    if isinstance(model, (str, os.PathLike)):
        from spt_embed.model.encoder import open_encoder

        model_spec = _model_spec(model) if model_spec is None else model_spec
        model = open_encoder(model_spec, dtype=dtype)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    corpus = CorpusSpec(
        str(Path(corpus_path).expanduser().resolve()),
        format=corpus_format,
        id_field=id_field,
        text_field=text_field,
        title_field=title_field,
        skip_bad_lines=skip_bad_lines,
    )
    corpus.check_file()
    output = Path(output).expanduser()
    options = dict(
        model_spec=model_spec or "",
        index_type=index_type,
        precision=precision,
        rescore_multiplier=rescore_multiplier,
        query_prompt=query_prompt,
        batch_size=batch_size,
        block_size=block_size,
        on_duplicate=on_duplicate,
    )
    if shard is not None:
        shard = Shard.parse(shard) if isinstance(shard, str) else shard
        if overwrite and (output / SHARD_FILE).is_file():
            shutil.rmtree(output)
        encode_shard(model, corpus, output, shard=shard, **options)
        return output
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite (Python: overwrite=True) to replace it.")
    if output.exists() and not (output / META_FILE).is_file():
        raise FileExistsError(f"{output} exists and is not an index folder; choose another output.")
    if next(iter_documents(corpus), None) is None:
        raise ValueError(f"{corpus.path} contains no documents.")
    # The parts of a one-machine run are an implementation detail: resumed when they fit, else started afresh.
    work = output.parent / f"{output.name}.parts"
    try:
        encode_shard(model, corpus, work, restart=True, **options)
    except CorpusChangedError as exc:
        logger.warning("%s; starting afresh.", exc)
        shutil.rmtree(work)
        encode_shard(model, corpus, work, **options)
    merge_shards([work], output, index_type=index_type, precision=precision, rescore_multiplier=rescore_multiplier,
                 on_duplicate=on_duplicate, overwrite=overwrite, model=model)
    if not keep_parts:
        shutil.rmtree(work)
    return output
