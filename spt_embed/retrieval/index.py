"""A FAISS index over an encoder's embeddings, with string ids, metadata, model checks and atomic saves.

Embeddings are L2-normalised and every index uses the inner-product metric, so scores are cosine similarities.
Documents go through ``model.encode_document`` and queries through ``model.encode_query`` (plus the optional
``query_prompt``, recorded in the metadata): a model's own query/document prompts apply as in mteb.

An index folder holds::

    index.faiss      the FAISS index (row i = document ids[i]); a FAISS binary index for binary precision
    index.ivfdata    an on-disk IVF index's inverted lists, memory-mapped at search time (spt_embed.retrieval.ondisk)
    ids.json         the document ids, a JSON list of strings
    offsets.npy      byte offset of each document in the corpus (only when the corpus file is recorded)
    int8_ranges.npy  int8 and binary-int8 only: the calibrated per-dimension (min, max), shape (2, dimension)
    rescore_int8.faiss  binary-int8 only: the int8 copy of the vectors that rescoring reads, memory-mapped
    index_meta.json  IndexMetadata: model, fingerprint, dimension, count, index type, precision, query prompt, versions

int8, binary and binary-int8 indexes store compressed vectors and rescore their candidates
(spt_embed.retrieval.precision).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from spt_embed.atomic import atomic_folder, previous_folder
from spt_embed.model.identity import model_fingerprint, prompt_routes
from spt_embed.recipe import enum_text
from spt_embed.retrieval.faiss_factory import IndexType, import_faiss
from spt_embed.retrieval.metadata import (
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    OFFSETS_FILE,
    SHARD_FILE,
    IndexMetadata,
    read_json,
    read_metadata,
)
from spt_embed.retrieval.ondisk import read_faiss_index, write_faiss_index
from spt_embed.retrieval.precision import (
    BINARY_PRECISIONS,
    CALIBRATED_PRECISIONS,
    DEFAULT_RESCORE_MULTIPLIER,
    RANGES_FILE,
    BinaryInt8Index,
    Precision,
    add_vectors,
    binary_bits,
    check_precision,
    check_rescore_multiplier,
    code_size,
    new_index,
    read_faiss,
    search_quantised,
    write_faiss,
)

logger = logging.getLogger(__name__)


def normalize(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32 rows scaled to unit length (all-zero rows stay zero), so that inner product = cosine."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    array = np.array(embeddings, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    np.divide(array, norms, out=array, where=norms > 0)
    return array


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity (inner product of unit vectors; approximate for PQ, int8 and binary indexes)


class Index:
    """A FAISS index with its document ids and metadata; `search` takes query texts or query embeddings.

    `ranges`: for int8 and binary-int8 precision, the calibrated per-dimension (min, max) the documents were
    quantised with."""

    def __init__(
        self, faiss_index, ids: Sequence[str], metadata: IndexMetadata, *, model=None, offsets=None, ranges=None
    ):
        precision = Precision(metadata.precision)
        width = binary_bits(metadata.dimension) if precision in BINARY_PRECISIONS else metadata.dimension
        if faiss_index.ntotal != len(ids) or faiss_index.d != width:
            raise ValueError(
                f"Inconsistent index: FAISS holds {faiss_index.ntotal} vectors of width {faiss_index.d} but there "
                f"are {len(ids)} ids and the metadata says dimension {metadata.dimension} ({precision.value})."
            )
        if offsets is not None and len(offsets) != len(ids):
            raise ValueError(f"{len(offsets)} corpus offsets for {len(ids)} ids.")
        if precision in CALIBRATED_PRECISIONS and ranges is None:
            raise ValueError(
                f"An {precision.value} index needs the ranges its documents were quantised with (ranges=...)."
            )
        if precision not in CALIBRATED_PRECISIONS and ranges is not None:
            raise ValueError(
                f"Quantisation ranges belong to int8 and binary-int8 indexes only; this index is {precision.value}."
            )
        if ranges is not None and np.shape(ranges) != (2, metadata.dimension):
            raise ValueError(f"int8 ranges have shape {np.shape(ranges)}, expected (2, {metadata.dimension}).")
        self.faiss_index = faiss_index
        self.ids = list(ids)
        self.metadata = metadata
        self.metadata.count = len(self.ids)
        self.offsets = offsets
        self.ranges = ranges
        self._model = None
        if model is not None:
            self.model = model

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"Index({len(self)} documents, {self.metadata.factory}, dimension {self.metadata.dimension}, "
            f"{self.metadata.precision}, {self.bytes_per_vector} bytes per vector)"
        )

    @property
    def bytes_per_vector(self) -> int | None:
        """Bytes one document vector takes in the FAISS index: 4 * dimension (float32), dimension (int8),
        dimension / 8 (binary), the code size of a PQ index. Graph links and ids are not counted; None if FAISS does
        not report a code size for this index type. binary-int8: the binary vectors that memory holds (see
        rescore_bytes_per_vector)."""
        return code_size(self.faiss_index)

    @property
    def rescore_bytes_per_vector(self) -> int | None:
        """binary-int8 only: bytes per vector of the int8 rescoring copy, memory-mapped from disk (None otherwise)."""
        return code_size(self.faiss_index.int8) if isinstance(self.faiss_index, BinaryInt8Index) else None

    @property
    def model(self):
        """The query encoder: set one, or it is opened from metadata.model on first use; checked either way."""
        if self._model is None:
            if not self.metadata.model:
                raise ValueError("This index records no model spec; pass the model: load_index(path, model=...).")
            from spt_embed.model.encoder import open_encoder

            self.model = open_encoder(self.metadata.model, dtype=self.metadata.dtype, backend=self.metadata.backend)
        return self._model

    @model.setter
    def model(self, model) -> None:
        dimension = model.get_embedding_dimension()
        if dimension != self.metadata.dimension:
            raise ValueError(
                f"Model embeds in {dimension} dimensions but the index holds {self.metadata.dimension}-dimensional "
                f"vectors (built by {self.metadata.model or 'an unnamed model'}): search with the model that built it."
            )
        fingerprint, _ = model_fingerprint(model)
        if fingerprint != self.metadata.fingerprint:
            raise ValueError(
                f"The index was built by model {self.metadata.model or '(unnamed)'} with fingerprint "
                f"{self.metadata.fingerprint}, but the given model has fingerprint {fingerprint}: its query "
                f"embeddings would not match the documents. Search with the model that built the index, or rebuild it."
            )
        routes = prompt_routes(model)
        if routes != self.metadata.prompt_routes:
            raise ValueError(
                f"The index's documents were encoded through soft prompts {self.metadata.prompt_routes or 'default'} "
                f"but this model routes {routes or 'every text through its default prompt'}: queries and documents "
                f"would not meet in the same space. Search with the model that built the index, or rebuild it."
            )
        self._model = model

    def encode_queries(self, queries: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Unit-length query embeddings (the query prompt applied), shape (len(queries), dimension)."""
        for position, query in enumerate(queries):
            if not isinstance(query, str):
                raise TypeError(f"Query {position} is {type(query).__name__}, expected str.")
            if not query.strip():
                raise ValueError(f"Query {position} is empty; remove it or give it text.")
        from spt_embed.model.encoder import compose_prompt

        embeddings = self.model.encode_query(
            list(queries),
            prompt=compose_prompt(self.model, self.metadata.query_prompt),  # inside the model's text template
            batch_size=batch_size,
            convert_to_numpy=True,
        )
        return normalize(embeddings)

    def search(
        self, queries: str | Sequence[str] | np.ndarray, k: int = 10, *, rescore_multiplier: int | None = None
    ) -> list[list[Hit]]:
        """Top-k hits per query, best first. `queries`: texts (encoded here) or an (n, dimension) array.

        A k larger than the index is clamped to its size with a warning; approximate indexes may return fewer hits.
        Compressed indexes fetch k * `rescore_multiplier` candidates (default: metadata.rescore_multiplier) and
        rescore them with the float queries; 0 keeps the compressed index's own ranking and scores.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if rescore_multiplier is None:
            rescore_multiplier = self.metadata.rescore_multiplier
        check_rescore_multiplier(rescore_multiplier)
        if isinstance(queries, str):
            queries = [queries]
        if len(queries) == 0:
            return []
        if isinstance(queries, (np.ndarray, torch.Tensor)):
            vectors = normalize(queries)
            if vectors.shape[1] != self.metadata.dimension:
                raise ValueError(
                    f"Query embeddings have dimension {vectors.shape[1]}, the index {self.metadata.dimension}."
                )
        else:
            vectors = self.encode_queries(list(queries))
        if k > len(self):
            logger.warning("k=%d is larger than the index (%d documents); returning %d hits.", k, len(self), len(self))
            k = len(self)
        precision = Precision(self.metadata.precision)
        if precision is Precision.FLOAT32:
            scores, positions = self.faiss_index.search(vectors, k)
        else:
            scores, positions = search_quantised(self.faiss_index, precision, vectors, k, rescore_multiplier)
        return [
            [Hit(self.ids[p], float(s)) for s, p in zip(row_scores, row_positions) if p >= 0]
            for row_scores, row_positions in zip(scores, positions)
        ]

    def document_text(self, doc_id: str) -> str | None:
        """The document's text read back from the recorded corpus file; None if no corpus is recorded or found."""
        from spt_embed.retrieval.corpus import CorpusFormat, CorpusSpec, read_document_at

        if self.metadata.corpus is None or self.offsets is None:
            return None
        if not hasattr(self, "_positions"):
            self._positions = {doc_id: position for position, doc_id in enumerate(self.ids)}
        spec = CorpusSpec(**self.metadata.corpus)
        try:
            document = read_document_at(spec, int(self.offsets[self._positions[doc_id]]))
        except (FileNotFoundError, ValueError) as exc:
            logger.warning("No text for %s: %s", doc_id, exc)
            return None
        if spec.format is not CorpusFormat.TEXT and document.id != doc_id:
            logger.warning("%s has changed since it was indexed: no text for %s.", spec.path, doc_id)
            return None
        return document.text

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the index folder atomically: a crash mid-write leaves any previous index at `path` intact."""
        saved = atomic_folder(path, self.write_into, overwrite=overwrite, marker=META_FILE)
        logger.info(
            "Saved %s: %d documents, %s, %s, %s bytes per vector", saved, len(self), self.metadata.factory,
            self.metadata.precision, self.bytes_per_vector,
        )
        return saved

    def write_into(self, folder: Path) -> None:
        """Write the index's files into the existing folder `folder` as they are (`save` publishes it atomically).
        On-disk inverted lists are copied into it unless they are already its index.ivfdata."""
        self.metadata.count = len(self)
        self.metadata.bytes_per_vector = self.bytes_per_vector
        self.metadata.faiss_version = import_faiss().__version__
        self.metadata.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if Precision(self.metadata.precision) in BINARY_PRECISIONS:  # binary indexes are never IVF on disk
            write_faiss(self.faiss_index, str(folder / INDEX_FILE))
            self.metadata.ivfdata = ""
        else:
            self.metadata.ivfdata = write_faiss_index(self.faiss_index, folder)
        if self.ranges is not None:
            np.save(folder / RANGES_FILE, np.asarray(self.ranges, dtype=np.float32))
        (folder / IDS_FILE).write_text(json.dumps(self.ids, ensure_ascii=False), encoding="utf-8")
        if self.offsets is not None:
            np.save(folder / OFFSETS_FILE, np.asarray(self.offsets, dtype=np.int64))
        meta = json.dumps(asdict(self.metadata), indent=2, ensure_ascii=False)
        (folder / META_FILE).write_text(meta + "\n", encoding="utf-8")


def load_index(path: str | os.PathLike, *, model=None) -> Index:
    """An index folder written by Index.save / `spt-embed index`. `model` (optional) is checked against it."""
    folder = Path(path).expanduser()
    previous = previous_folder(folder)
    if not folder.exists() and (previous / META_FILE).is_file():
        logger.warning("%s is missing but %s exists (a save was interrupted); loading that.", folder, previous)
        folder = previous
    if not (folder / META_FILE).is_file():
        shard = (folder / SHARD_FILE).is_file()
        hint = " It is a shard folder: combine shards with `spt-embed index-merge`." if shard else ""
        raise FileNotFoundError(f"{folder} is not an index folder (no {META_FILE}).{hint}")
    metadata = read_metadata(folder)
    ids = read_json(folder / IDS_FILE)
    if not isinstance(ids, list) or not all(isinstance(doc_id, str) for doc_id in ids):
        raise ValueError(f"{folder / IDS_FILE} must be a JSON list of string ids.")
    offsets = None
    if (folder / OFFSETS_FILE).is_file():
        try:
            offsets = np.load(folder / OFFSETS_FILE)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(_damaged(folder / OFFSETS_FILE, exc)) from None
    ranges = None
    if Precision(metadata.precision) in CALIBRATED_PRECISIONS:
        try:
            ranges = np.load(folder / RANGES_FILE)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(_damaged(folder / RANGES_FILE, exc)) from None
    try:
        if Precision(metadata.precision) in BINARY_PRECISIONS:
            faiss_index = read_faiss(str(folder / INDEX_FILE), metadata.precision)
        else:  # an on-disk IVF index's lists (metadata.ivfdata) are memory-mapped from this folder, not read
            faiss_index = read_faiss_index(folder, metadata.ivfdata)
    except RuntimeError as exc:  # faiss reports a missing, truncated or foreign file as a RuntimeError
        raise ValueError(_damaged(folder / INDEX_FILE, exc)) from None
    except (OSError, ValueError) as exc:  # the lists file is missing or short, or the metadata names no file
        raise ValueError(_damaged(folder / metadata.ivfdata, exc)) from None
    return Index(faiss_index, ids, metadata, model=model, offsets=offsets, ranges=ranges)


def _damaged(file: Path, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return (
        f"{file} is missing, truncated or damaged ({reason}). Rebuild the index: rerun `spt-embed index` with "
        f"--overwrite (or `spt-embed index-merge` over its shards)."
    )


def check_unique_ids(ids: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for position, doc_id in enumerate(ids):
        if doc_id in seen:
            raise ValueError(f"Document id {doc_id!r} appears twice (positions {seen[doc_id]} and {position}).")
        seen[doc_id] = position


def index_from_embeddings(
    embeddings: np.ndarray, ids: Sequence[str], metadata: IndexMetadata, *, model=None, offsets=None, seed: int = 0
) -> Index:
    """An Index of `metadata.index_type` storing `metadata.precision` vectors, over precomputed (normalised here)
    embeddings. `seed` draws the sample that trains an IVF/PQ index or calibrates int8."""
    check_precision(metadata.precision, metadata.index_type)
    vectors = normalize(embeddings)
    if len(vectors) != len(ids):
        raise ValueError(f"{len(vectors)} embeddings for {len(ids)} ids.")
    if not len(ids):
        raise ValueError("Cannot build an index over an empty corpus.")
    check_unique_ids(ids)
    rng = np.random.default_rng(seed)

    def sample(n: int) -> np.ndarray:
        return vectors[np.sort(rng.choice(len(vectors), n, replace=False))]

    faiss_index, ranges = new_index(metadata, len(vectors), sample, seed)
    add_vectors(faiss_index, metadata.precision, vectors, ranges)
    return Index(faiss_index, ids, metadata, model=model, offsets=offsets, ranges=ranges)


def build_index(
    model,
    texts: Sequence[str],
    ids: Sequence[str] | None = None,
    *,
    index_type: str = IndexType.FLAT.value,
    precision: Precision | str = Precision.FLOAT32,
    rescore_multiplier: int = DEFAULT_RESCORE_MULTIPLIER,
    query_prompt: str | None = None,
    model_spec: str = "",
    batch_size: int = 32,
    show_progress_bar: bool = False,
) -> Index:
    """Encode `texts` (in memory) with `model` and index them; `ids` default to "0", "1", ...

    For corpora on disk, streamed and resumable, use spt_embed.index_corpus. `model_spec` is recorded so that a
    loaded index can reopen its model by itself. Empty (or all-whitespace) texts are left out with a warning, as
    index_corpus does: their embedding is the prompt's alone, which would rank high for unrelated queries.
    `precision`: float32, int8, binary or binary-int8 document vectors (compressed ones with flat or hnsw only);
    their searches rescore k * `rescore_multiplier` candidates by default.
    """
    precision = check_precision(precision, index_type)
    check_rescore_multiplier(rescore_multiplier)
    texts = list(texts)
    ids = [str(i) for i in range(len(texts))] if ids is None else [str(doc_id) for doc_id in ids]
    if len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids; give one id per text.")
    if not texts:
        raise ValueError("Cannot build an index over an empty corpus: no texts given.")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text {position} is {type(text).__name__}, expected str.")
    check_unique_ids(ids)
    empty = [doc_id for doc_id, text in zip(ids, texts) if not text.strip()]
    if empty:
        if len(empty) == len(texts):
            raise ValueError(f"Cannot build an index: all {len(texts)} texts are empty.")
        logger.warning("Skipped %d empty text(s) (ids %s); an empty text has nothing to match.", len(empty), empty[:5])
        ids, texts = zip(*[(doc_id, text) for doc_id, text in zip(ids, texts) if text.strip()])
    from spt_embed.model.dtypes import weights_dtype

    fingerprint, backbone = model_fingerprint(model)
    metadata = IndexMetadata(
        fingerprint=fingerprint,
        dimension=model.get_embedding_dimension(),
        model=model_spec,
        backbone_fingerprint=backbone,
        index_type=enum_text(index_type),
        query_prompt=query_prompt,
        prompt_routes=prompt_routes(model),
        dtype=weights_dtype(model),
        backend=model.get_backend(),
        precision=precision.value,
        rescore_multiplier=rescore_multiplier,
        skipped_empty=len(empty),
    )
    embeddings = model.encode_document(
        list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=show_progress_bar
    )
    return index_from_embeddings(embeddings, ids, metadata, model=model)
