"""Corpus file to index folder: sharded encoding (spt_embed.retrieval.shards), then a merge into one FAISS index.

``index_corpus`` encodes a corpus file into an index folder (or, with ``shard="i/N"``, into one shard folder).
``merge_shards`` (CLI ``index-merge``) checks that the shards come from one model, query prompt and a complete set
i = 0..N-1, reports ids found in more than one shard, and builds the index by its type:

- flat, HNSW (and IVF variants merge_ondisk cannot hold): one in-memory FAISS index, filled part by part and
  written whole into index.faiss; the merge holds every vector in memory.
- IVF (the ivfpq preset, IVF<n>,Flat / PQ / SQ factory strings): trained once on a sample read across the shards,
  each shard added to a copy of the trained index (one shard in memory at a time) and the copies merged with
  faiss.contrib.ondisk.merge_ondisk into index.ivfdata, memory-mapped at search time (spt_embed.retrieval.ondisk).

Beyond one machine: run the N shard jobs anywhere (a batch scheduler, one job per GPU or node) on the same corpus
file, copy the shard folders to one machine and merge there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spt_embed.atomic import atomic_folder
from spt_embed.recipe import enum_text, parse_enum
from spt_embed.retrieval.corpus import CorpusSpec, Shard, iter_documents
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.index import Index, load_index
from spt_embed.retrieval.metadata import (
    DEFAULT_BLOCK_SIZE,
    META_FILE,
    SHARD_FILE,
    IndexMetadata,
    OnDuplicate,
    ShardMetadata,
)
from spt_embed.retrieval.ondisk import build_ondisk, can_merge_ondisk
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

    IVF index types get their inverted lists on disk (index.ivfdata, memory-mapped), flat and HNSW are built in
    memory; see the module docstring. `index_type`, `precision` and `rescore_multiplier` default to the ones the
    shards were made for. An existing `output` is refused before any work unless `overwrite`.
    """
    output = Path(output).expanduser()
    _check_output(output, overwrite)
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

    shard_parts = [list_parts(folder) for folder, _ in shards]
    parts = [part for folder_parts in shard_parts for part in folder_parts]
    masks, ids = _dedupe_parts(parts, parse_enum(OnDuplicate, on_duplicate, "on_duplicate"))
    skipped_empty = sum(meta.skipped_empty for _, meta in shards)
    if not ids:
        empty = f"; {skipped_empty} document(s) with no text were skipped" if skipped_empty else ""
        raise ValueError(f"The shards hold no documents ({', '.join(str(f) for f, _ in shards)}{empty}).")
    sizes = [int(mask.sum()) for mask in masks]
    rng = np.random.default_rng(seed)
    dimension = first.dimension
    metadata = first.index_metadata(enum_text(index_type))
    metadata.precision, metadata.rescore_multiplier, metadata.skipped_empty = (
        precision.value, rescore_multiplier, skipped_empty
    )
    faiss_index, ranges = new_index(
        metadata, len(ids), lambda n: _sample(parts, masks, sizes, n, rng, dimension), seed
    )
    corpora = {json.dumps(meta.corpus, sort_keys=True) for _, meta in shards}
    offsets = None
    if len(corpora) == 1:
        offsets = np.concatenate([np.load(part)["offsets"][mask] for part, mask in zip(parts, masks)])
    if offsets is None:
        metadata.corpus = None  # documents from several files: no single file to show snippets from
    if precision is Precision.FLOAT32 and can_merge_ondisk(faiss_index):
        starts = np.cumsum([0] + [len(folder_parts) for folder_parts in shard_parts])
        blocks = [
            _vectors(parts[start:stop], masks[start:stop], dimension) for start, stop in zip(starts[:-1], starts[1:])
        ]
        index = write_ondisk_index(
            faiss_index, blocks, ids, metadata, output, offsets=offsets, overwrite=overwrite, model=model
        )
    else:
        for vectors in tqdm(_vectors(parts, masks, dimension), total=len(parts), desc="add to index", unit="part",
                            disable=len(parts) < 2):
            add_vectors(faiss_index, precision, vectors, ranges)
        index = Index(faiss_index, ids, metadata, model=model, offsets=offsets, ranges=ranges)
        index.save(output, overwrite=overwrite)
    where = f", inverted lists on disk in {index.metadata.ivfdata}" if index.metadata.ivfdata else ""
    logger.info(
        "Wrote %s: %d documents, %s, %s (%s bytes per vector), from %d shard(s)%s.", output, len(index),
        metadata.factory, precision.value, index.bytes_per_vector, len(shards), where,
    )
    return index


def write_ondisk_index(
    trained,
    shards: Sequence[Iterable[np.ndarray]],
    ids: Sequence[str],
    metadata: IndexMetadata,
    output: str | os.PathLike,
    *,
    offsets: np.ndarray | None = None,
    overwrite: bool = False,
    model=None,
) -> Index:
    """Write an index folder at `output` (atomically) whose IVF inverted lists are on disk; returns it, loaded.

    `trained`: an empty, trained IVF FAISS index (e.g. from new_faiss_index) that `can_merge_ondisk`; it receives
    the merged lists. `shards`: per shard, its blocks of unit-length vectors, rows in the order of `ids`. Each shard
    becomes a block index and the blocks are merged into `output`/index.ivfdata (spt_embed.retrieval.ondisk.
    build_ondisk). The returned index maps the published folder's lists.
    """

    def write(folder: Path) -> None:
        faiss_index = build_ondisk(trained, shards, folder)
        Index(faiss_index, ids, metadata, offsets=offsets).write_into(folder)

    atomic_folder(output, write, overwrite=overwrite, marker=META_FILE)
    return load_index(output, model=model)


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output before any work: without `overwrite`, or when it is not an index folder."""
    if not output.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"{output} exists; nothing was written. Pass --overwrite (Python: overwrite=True) to replace it, or "
            f"choose another --output."
        )
    if not (output / META_FILE).is_file():
        raise FileExistsError(f"{output} exists and is not an index folder (no {META_FILE}); choose another output.")


def _embeddings(part: Path, mask: np.ndarray, dimension: int) -> np.ndarray:
    """The kept rows of a part, float32 and contiguous; a width other than the shard's dimension is an error."""
    embeddings = np.load(part)["embeddings"]
    if embeddings.ndim != 2 or embeddings.shape[1] != dimension:
        raise ValueError(
            f"{part} holds embeddings of shape {embeddings.shape}, but its shard folder records dimension "
            f"{dimension}: the shard is damaged. Rerun its `spt-embed index --shard ...` job with --overwrite."
        )
    return np.ascontiguousarray(embeddings[mask], dtype=np.float32)


def _vectors(parts: Sequence[Path], masks: Sequence[np.ndarray], dimension: int) -> Iterator[np.ndarray]:
    """The kept embeddings of `parts`, one part at a time."""
    for part, mask in zip(parts, masks):
        yield _embeddings(part, mask, dimension)


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


def _sample(parts: list[Path], masks: list[np.ndarray], sizes: list[int], n: int, rng, dimension: int) -> np.ndarray:
    """n random kept rows across all parts, reading one part at a time and keeping only the chosen rows."""
    total = sum(sizes)
    chosen = np.sort(rng.choice(total, size=n, replace=False))
    rows, start = [], 0
    for part, mask, size in zip(parts, masks, sizes):
        local = chosen[(chosen >= start) & (chosen < start + size)] - start
        if len(local):
            rows.append(_embeddings(part, mask, dimension)[local])
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
    backend: str = "torch",
) -> Path:
    """Encode a corpus file and write an index folder at `output` (or, with `shard`, a shard folder to merge).

    `model`: a model spec (adapter folder, bundled adapter name, SentenceTransformer folder) or a loaded
    SentenceTransformer (then pass `model_spec` for the index to record how to reopen it). Without `shard`, the
    embeddings go to `OUTPUT.parts/` first, so that a killed run resumes; it is removed at the end unless
    `keep_parts`. With `shard`, `overwrite` deletes an existing shard folder instead of resuming it. `dtype`: the
    weights' dtype a model spec is opened in (recorded; search encodes queries in it); `backend`: "onnx" or
    "openvino" runs the model file an export wrote (spt_embed.model.export.open_exported; recorded, as dtype is).
    `precision`: float32, int8 or
    binary(-int8) document vectors (compressed ones with flat or hnsw only; a shard records it for the merge); their
    searches rescore k * `rescore_multiplier` candidates by default.
    """
    # Checked before the model is opened: a refused combination costs no encoding.
    precision = check_precision(precision, index_type)
    check_rescore_multiplier(rescore_multiplier)
    if isinstance(model, (str, os.PathLike)):
        from spt_embed.model.encoder import open_encoder

        model_spec = _model_spec(model) if model_spec is None else model_spec
        model = open_encoder(model_spec, dtype=dtype, backend=backend)
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
