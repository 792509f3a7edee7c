"""Corpus file to index folder: streamed, sharded, resumable encoding, then a merge into one FAISS index.

A shard job (``index_corpus(..., shard="i/N")``, CLI ``--shard i/N``) encodes the records r with r % N == i
(records numbered 0, 1, ... in file order, see spt_embed.retrieval.corpus) into a shard folder::

    shard.json          ShardMetadata: model fingerprint, corpus, shard, block size, complete or not
    parts/000000.npz    one finished block: embeddings (float32, unit length), ids, records, offsets
    parts/000001.npz    ...

The corpus is read in blocks of `block_size` documents; each block is encoded longest text first (batches of
similar length waste little padding) and written as one part, atomically. A killed job rerun with the same command
skips the finished parts (checking that the corpus still yields the same records) and encodes only the rest.
``merge_shards`` (CLI ``index-merge``) checks that the shards come from one model, query prompt and a complete set
i = 0..N-1, reports ids found in more than one shard, and builds the index part by part.

Beyond one machine: run the N shard jobs anywhere (a batch scheduler, one job per GPU or node) on the same corpus
file, copy the shard folders to one machine and merge there. Only the merge needs all embeddings in one place
(for flat/hnsw it holds them in memory; ivfpq keeps ~64 bytes per document).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from spt_embed.retrieval.corpus import CorpusSpec, Document, Shard, count_records, iter_documents
from spt_embed.model.encoder import weights_dtype
from spt_embed.retrieval.index import Index, IndexMetadata, IndexType, META_FILE, model_fingerprint, new_faiss_index, normalize

logger = logging.getLogger(__name__)

SHARD_FILE = "shard.json"
PARTS_DIR = "parts"
DEFAULT_BLOCK_SIZE = 1024
MAX_REPORTED_DUPLICATES = 5


class OnDuplicate(str, enum.Enum):
    ERROR = "error"  # stop, naming the id and where both copies are
    KEEP_FIRST = "keep-first"  # keep the first copy (file order; shard order in a merge), log the others


@dataclass
class ShardMetadata:
    """`shard.json`: what a shard folder holds and how it was made (all of it must match to resume or merge)."""

    fingerprint: str = field(metadata={"help": "model_fingerprint() of the encoder."})
    dimension: int = field(metadata={"help": "Embedding width."})
    corpus: dict[str, Any] = field(metadata={"help": "CorpusSpec of the corpus file (absolute path)."})
    shard: str = field(default="0/1", metadata={"help": "i/N: the records r with r % N == i."})
    model: str = field(default="", metadata={"help": "Model spec the encoder was opened from."})
    backbone_fingerprint: str = field(default="", metadata={"help": "SPT only: the backbone's fingerprint."})
    query_prompt: str | None = field(default=None, metadata={"help": "Query prompt the index will apply."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype of the encoder (resume in the same)."})
    index_type: str = field(default=IndexType.FLAT.value, metadata={"help": "Index type the merge builds by default."})
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata={"help": "Documents per part (resume granularity)."})
    on_duplicate: str = field(default=OnDuplicate.ERROR.value, metadata={"help": "error or keep-first."})
    complete: bool = field(default=False, metadata={"help": "True once every part is written."})
    count: int = field(default=0, metadata={"help": "Documents in the shard (once complete)."})
    parts: int = field(default=0, metadata={"help": "Number of parts (once complete)."})
    spt_embed_version: str = field(default="", metadata={"help": "Library version that wrote the shard."})

    def __post_init__(self) -> None:
        Shard.parse(self.shard)
        self.on_duplicate = OnDuplicate(self.on_duplicate).value
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}.")
        if not self.spt_embed_version:
            from spt_embed._version import __version__

            self.spt_embed_version = __version__

    def save(self, folder: Path) -> None:
        _atomic_write_text(folder / SHARD_FILE, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ShardMetadata:
        path = Path(folder) / SHARD_FILE
        if not path.is_file():
            hint = " It is an index folder, not a shard." if (Path(folder) / META_FILE).is_file() else ""
            raise FileNotFoundError(f"{folder} is not a shard folder (no {SHARD_FILE}).{hint}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{key: value for key, value in data.items() if key in {f.name for f in fields(cls)}})
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is corrupted ({exc}).") from None

    def index_metadata(self, index_type: str) -> IndexMetadata:
        return IndexMetadata(
            fingerprint=self.fingerprint,
            dimension=self.dimension,
            model=self.model,
            backbone_fingerprint=self.backbone_fingerprint,
            index_type=index_type,
            query_prompt=self.query_prompt,
            corpus=self.corpus,
            dtype=self.dtype,
        )


def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def _write_part(folder: Path, number: int, documents: list[Document], embeddings: np.ndarray) -> None:
    parts = folder / PARTS_DIR
    with tempfile.NamedTemporaryFile(dir=parts, suffix=".tmp", delete=False) as handle:
        np.savez(
            handle,
            embeddings=embeddings.astype(np.float32, copy=False),
            ids=np.array([d.id for d in documents], dtype=np.str_),
            records=np.array([d.record for d in documents], dtype=np.int64),
            offsets=np.array([d.offset for d in documents], dtype=np.int64),
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, parts / f"{number:06d}.npz")


def list_parts(folder: Path) -> list[Path]:
    """The finished parts in order; a gap means the folder was tampered with."""
    parts = sorted((Path(folder) / PARTS_DIR).glob("*.npz"))
    for expected, part in enumerate(parts):
        if part.stem != f"{expected:06d}":
            raise ValueError(f"{folder}: part {expected:06d}.npz is missing but {part.name} exists; delete the folder.")
    return parts


def encode_block(model, texts: list[str], batch_size: int, progress: tqdm | None = None) -> np.ndarray:
    """Unit-length document embeddings of `texts`, in their order, encoded longest first in batches."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.empty((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = model.encode_document(
            [texts[i] for i in rows], batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        out[rows] = normalize(batch)
        if progress is not None:
            progress.update(len(rows))
    return out


def _blocks(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    block: list[Document] = []
    for document in documents:
        block.append(document)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


class _Duplicates:
    """Ids seen so far (id -> line); raises on a repeat or, with keep-first, drops and counts it."""

    def __init__(self, policy: OnDuplicate, source: str):
        self.policy, self.source, self.seen, self.dropped = policy, source, {}, 0

    def keep(self, doc_id: str, line: int) -> bool:
        first = self.seen.get(doc_id)
        if first is None:
            self.seen[doc_id] = line
            return True
        message = f"document id {doc_id!r} appears twice in {self.source}: lines {first} and {line}"
        if self.policy is OnDuplicate.ERROR:
            raise ValueError(f"{message}. Make ids unique, or keep the first copy with --on-duplicate keep-first.")
        self.dropped += 1
        if self.dropped <= MAX_REPORTED_DUPLICATES:
            logger.warning("%s; keeping the first.", message)
        return False


def encode_shard(
    model,
    corpus: CorpusSpec,
    folder: str | os.PathLike,
    *,
    shard: Shard = Shard(),
    model_spec: str = "",
    index_type: str = IndexType.FLAT.value,
    query_prompt: str | None = None,
    batch_size: int = 32,
    block_size: int = DEFAULT_BLOCK_SIZE,
    on_duplicate: OnDuplicate | str = OnDuplicate.ERROR,
    restart: bool = False,
) -> ShardMetadata:
    """Encode `shard` of `corpus` into `folder`, resuming from the parts already there.

    A folder made with other settings is an error, or (`restart`) deleted and started afresh.
    """
    folder = Path(folder)
    fingerprint, backbone = model_fingerprint(model)
    wanted = ShardMetadata(
        fingerprint=fingerprint,
        dimension=model.get_embedding_dimension(),
        corpus=corpus.to_dict(),
        shard=str(shard),
        model=model_spec,
        backbone_fingerprint=backbone,
        query_prompt=query_prompt,
        dtype=weights_dtype(model),
        index_type=str(getattr(index_type, "value", index_type)),
        block_size=block_size,
        on_duplicate=OnDuplicate(on_duplicate).value,
    )
    meta = ShardMetadata.load(folder) if (folder / SHARD_FILE).is_file() else None
    mismatch = _mismatch(meta, wanted) if meta is not None else None
    if mismatch and restart:
        logger.info("%s was made with %s; starting it afresh.", folder, mismatch)
        shutil.rmtree(folder)
        meta = None
    if meta is None:
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and is not a shard folder; choose an empty or new output folder.")
        (folder / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        wanted.save(folder)
        meta = wanted
    elif mismatch:
        raise ValueError(
            f"{folder} holds a shard made with {mismatch}: it cannot be resumed with these settings. Rerun with the "
            f"original settings, or start afresh with --overwrite (Python: overwrite=True)."
        )
    elif meta.complete:
        logger.info("%s: shard %s is already complete (%d documents).", folder, meta.shard, meta.count)
        return meta
    for stale in (folder / PARTS_DIR).glob("*.tmp"):  # a part that was being written when the job died
        stale.unlink()
    done = list_parts(folder)
    if done:
        logger.info("%s: resuming shard %s after %d finished part(s).", folder, shard, len(done))

    records = count_records(corpus)
    total = None if records is None else max(0, (records - shard.index + shard.count - 1) // shard.count)
    duplicates = _Duplicates(OnDuplicate(meta.on_duplicate), f"{corpus.path} (shard {shard})")
    blocks = 0
    with tqdm(total=total, unit="doc", desc=f"encode {Path(corpus.path).name} [{shard}]", dynamic_ncols=True) as bar:
        for number, block in enumerate(_blocks(iter_documents(corpus, shard), meta.block_size)):
            blocks = number + 1
            kept = [d for d in block if duplicates.keep(d.id, d.line)]
            if number < len(done):
                stored = np.load(done[number])["records"]
                if not np.array_equal(stored, [d.record for d in kept]):
                    raise CorpusChangedError(
                        f"{corpus.path} no longer yields the documents of {done[number]}: the corpus changed since "
                        f"this shard started. Delete {folder} (or pass --overwrite) and start again."
                    )
                bar.update(len(block))
                continue
            embeddings = encode_block(model, [d.text for d in kept], batch_size, bar)
            _write_part(folder, number, kept, embeddings)
            bar.update(len(block) - len(kept))
    if blocks < len(done):
        raise CorpusChangedError(f"{folder} has {len(done)} parts but the corpus now gives {blocks} blocks.")
    if duplicates.dropped:
        logger.warning("%s: dropped %d duplicate document(s), kept the first copy of each.", folder, duplicates.dropped)
    meta.complete, meta.count, meta.parts = True, len(duplicates.seen), blocks
    meta.save(folder)
    if not meta.count:
        logger.warning("%s: shard %s of %s has no documents.", folder, shard, corpus.path)
    logger.info("%s: shard %s complete, %d documents in %d part(s).", folder, shard, meta.count, meta.parts)
    return meta


def _mismatch(found: ShardMetadata, wanted: ShardMetadata) -> str | None:
    """The first setting that differs between a shard folder and a new job, as 'name=found, not wanted'."""
    for name in ("fingerprint", "dimension", "dtype", "corpus", "shard", "block_size", "query_prompt", "on_duplicate"):
        if getattr(found, name) != getattr(wanted, name):
            return f"{name}={getattr(found, name)!r}, not {getattr(wanted, name)!r}"
    return None


class CorpusChangedError(ValueError):
    """The corpus no longer yields the documents of the parts already written."""


def merge_shards(
    shard_dirs: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    index_type: str | None = None,
    on_duplicate: OnDuplicate | str = OnDuplicate.ERROR,
    overwrite: bool = False,
    model=None,
    seed: int = 0,
) -> Index:
    """One index from complete shard folders (all from one model and query prompt); saved at `output`."""
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

    parts = [part for folder, _ in shards for part in list_parts(folder)]
    masks, ids = _dedupe_parts(parts, OnDuplicate(on_duplicate))
    if not ids:
        raise ValueError(f"The shards hold no documents ({', '.join(str(f) for f, _ in shards)}).")
    sizes = [int(mask.sum()) for mask in masks]
    rng = np.random.default_rng(seed)
    faiss_index, factory = new_faiss_index(
        index_type, len(ids), first.dimension, lambda n: _sample(parts, masks, sizes, n, rng)
    )
    for part, mask in zip(tqdm(parts, desc="add to index", unit="part", disable=len(parts) < 2), masks):
        faiss_index.add(np.ascontiguousarray(np.load(part)["embeddings"][mask]))
    corpora = {json.dumps(meta.corpus, sort_keys=True) for _, meta in shards}
    offsets = None
    if len(corpora) == 1:
        offsets = np.concatenate([np.load(part)["offsets"][mask] for part, mask in zip(parts, masks)])
    metadata = first.index_metadata(str(getattr(index_type, "value", index_type)))
    metadata.factory = factory
    if offsets is None:
        metadata.corpus = None  # documents from several files: no single file to show snippets from
    index = Index(faiss_index, ids, metadata, model=model, offsets=offsets)
    index.save(output, overwrite=overwrite)
    logger.info("Wrote %s: %d documents, %s, from %d shard(s).", output, len(index), factory, len(shards))
    return index


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
    from spt_embed.model.encoder import bundled_adapters

    text = os.fspath(model)
    return text if text in bundled_adapters() or not Path(text).expanduser().exists() else str(
        Path(text).expanduser().resolve()
    )


def index_corpus(
    model,
    corpus_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    index_type: str = IndexType.FLAT.value,
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
    weights' dtype a model spec is opened in (recorded; search encodes queries in it).
    """
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
        logger.info("%s; starting afresh.", exc)
        shutil.rmtree(work)
        encode_shard(model, corpus, work, **options)
    merge_shards([work], output, index_type=index_type, on_duplicate=on_duplicate, overwrite=overwrite, model=model)
    if not keep_parts:
        shutil.rmtree(work)
    return output
