"""Sharded, resumable encoding of a corpus file into a shard folder of parts.

A shard job (``index_corpus(..., shard="i/N")``, CLI ``--shard i/N``) encodes the records r with r % N == i
(records numbered 0, 1, ... in file order, see spt_embed.retrieval.corpus) into a shard folder::

    shard.json          ShardMetadata: model fingerprint, corpus, shard, block size, complete or not
    parts/000000.npz    one finished block: embeddings (float32, unit length), ids, records, offsets, digest
    parts/000001.npz    ...

The corpus is read in blocks of `block_size` records; each block is encoded longest text first (batches of
similar length waste little padding) and written as one part, atomically. A killed job rerun with the same command
skips the finished parts and encodes only the rest: each part stores a digest of its records' numbers, ids and
texts, and a part whose block the corpus no longer yields identically is a CorpusChangedError, so an edited corpus
never keeps stale embeddings. Documents with no text are skipped (and counted): an empty text would embed as the
encoder's prompt alone, a vector that scores high against unrelated queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spt_embed.atomic import atomic_file
from spt_embed.model.dtypes import weights_dtype
from spt_embed.recipe import enum_text, parse_enum
from spt_embed.retrieval.corpus import CorpusSpec, Document, Shard, count_records, iter_documents
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.index import model_fingerprint, normalize, prompt_routes
from spt_embed.retrieval.metadata import DEFAULT_BLOCK_SIZE, PARTS_DIR, SHARD_FILE, OnDuplicate, ShardMetadata
from spt_embed.retrieval.precision import DEFAULT_RESCORE_MULTIPLIER, Precision

logger = logging.getLogger(__name__)

MAX_REPORTED_DUPLICATES = 5
MAX_REPORTED_EMPTY = 10  # line numbers of empty documents named in the log


def block_digest(documents: list[Document]) -> str:
    """sha256 over the documents' record numbers, ids and texts: what a resumed job must find again to reuse a part."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(json.dumps([document.record, document.id, document.text]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _write_part(folder: Path, number: int, documents: list[Document], embeddings: np.ndarray) -> None:
    with atomic_file(folder / PARTS_DIR / f"{number:06d}.npz", "wb") as handle:
        np.savez(
            handle,
            embeddings=embeddings.astype(np.float32, copy=False),
            ids=np.array([d.id for d in documents], dtype=np.str_),
            records=np.array([d.record for d in documents], dtype=np.int64),
            offsets=np.array([d.offset for d in documents], dtype=np.int64),
            digest=np.array(block_digest(documents)),
        )


def _stored_digest(part: Path) -> str | None:
    with np.load(part) as stored:
        return str(stored["digest"]) if "digest" in stored.files else None


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


class EmptyDocuments:
    """Documents with no text (after joining title and text), skipped and counted."""

    def __init__(self):
        self.lines: list[int] = []

    def skip(self, document: Document) -> bool:
        if document.text.strip():
            return False
        self.lines.append(document.line)
        return True

    def report(self, folder: Path, source: str) -> None:
        if self.lines:
            more = ", ..." if len(self.lines) > MAX_REPORTED_EMPTY else ""
            logger.warning(
                "%s: skipped %d document(s) with no text in %s (line(s) %s%s); an empty text has nothing to match.",
                folder, len(self.lines), source, ", ".join(map(str, self.lines[:MAX_REPORTED_EMPTY])), more,
            )


class DuplicateIds:
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
    precision: Precision | str = Precision.FLOAT32,
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
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
        prompt_routes=prompt_routes(model),
        dtype=weights_dtype(model),
        backend=model.get_backend(),
        index_type=enum_text(index_type),
        precision=enum_text(precision),
        rescore_multiplier=rescore_multiplier,
        block_size=block_size,
        on_duplicate=parse_enum(OnDuplicate, on_duplicate, "on_duplicate").value,
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
        # Still checked against the corpus below: a complete folder is reused only while the corpus is unchanged.
        logger.info("%s: shard %s is complete (%d documents); checking the corpus.", folder, meta.shard, meta.count)
    for stale in (folder / PARTS_DIR).glob("*.tmp"):  # a part that was being written when the job died
        stale.unlink()
    done = list_parts(folder)
    if done:
        logger.info("%s: resuming shard %s after %d finished part(s).", folder, shard, len(done))

    records = count_records(corpus)
    total = None if records is None else max(0, (records - shard.index + shard.count - 1) // shard.count)
    source = f"{corpus.path} (shard {shard})"
    duplicates = DuplicateIds(parse_enum(OnDuplicate, meta.on_duplicate, "on_duplicate"), source)
    empty = EmptyDocuments()
    blocks = 0
    with tqdm(total=total, unit="doc", desc=f"encode {Path(corpus.path).name} [{shard}]", dynamic_ncols=True) as bar:
        for number, block in enumerate(_blocks(iter_documents(corpus, shard), meta.block_size)):
            blocks = number + 1
            kept = [d for d in block if not empty.skip(d) and duplicates.keep(d.id, d.line)]
            if number < len(done):
                if _stored_digest(done[number]) != block_digest(kept):
                    raise CorpusChangedError(
                        f"{corpus.path} no longer yields the documents of {done[number]} (their ids or texts "
                        f"differ): the corpus changed since this shard was encoded. Delete {folder} (or pass "
                        f"--overwrite) and start again."
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
    empty.report(folder, source)
    meta.complete, meta.count, meta.parts, meta.skipped_empty = True, len(duplicates.seen), blocks, len(empty.lines)
    meta.save(folder)
    if not meta.count:
        logger.warning("%s: shard %s of %s has no documents.", folder, shard, corpus.path)
    logger.info("%s: shard %s complete, %d documents in %d part(s).", folder, shard, meta.count, meta.parts)
    return meta


def _mismatch(found: ShardMetadata, wanted: ShardMetadata) -> str | None:
    """The first setting that differs between a shard folder and a new job, as 'name=found, not wanted'."""
    for name in ("fingerprint", "dimension", "dtype", "backend", "corpus", "shard", "block_size", "query_prompt",
                 "on_duplicate", "prompt_routes"):
        if getattr(found, name) != getattr(wanted, name):
            return f"{name}={getattr(found, name)!r}, not {getattr(wanted, name)!r}"
    return None


class CorpusChangedError(ValueError):
    """The corpus no longer yields the documents of the parts already written."""
