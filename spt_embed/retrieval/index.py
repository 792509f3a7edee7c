"""A FAISS index over an encoder's embeddings, with string ids, metadata, model checks and atomic saves.

Embeddings are L2-normalised and every index uses the inner-product metric, so scores are cosine similarities.
Documents go through ``model.encode_document`` and queries through ``model.encode_query`` (plus the optional
``query_prompt``, recorded in the metadata): a model's own query/document prompts apply as in mteb.

An index folder holds::

    index.faiss      the FAISS index (row i = document ids[i])
    ids.json         the document ids, a JSON list of strings
    offsets.npy      byte offset of each document in the corpus (only when the corpus file is recorded)
    index_meta.json  IndexMetadata: model, fingerprint, dimension, count, index type, query prompt, versions
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
OFFSETS_FILE = "offsets.npy"
META_FILE = "index_meta.json"

# HNSW: 32 links per node; efConstruction/efSearch trade build and query time for recall (efSearch is stored in
# the index file). eval/faiss_retrieval.py measures the recall against the exact index.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128
# IVF-PQ: at most this many vectors train the coarse quantizer and the product quantizer (a random sample).
TRAIN_SAMPLE = 100_000
# k-means wants at least this many training points per centroid (FAISS warns below 39).
MIN_POINTS_PER_CENTROID = 39


class IndexType(str, enum.Enum):
    """Named presets; any other string is passed to faiss.index_factory."""

    FLAT = "flat"  # exact inner product
    HNSW = "hnsw"  # graph index: fast, approximate, no training, ~1.1x the memory of flat
    IVFPQ = "ivfpq"  # inverted lists + product quantisation: for large corpora, trained on a sample


def resolve_factory(index_type: str, count: int, dimension: int) -> str:
    """The FAISS factory string for a preset (sized for `count` vectors) or a factory string as it is."""
    preset = {t.value: t for t in IndexType}.get(str(getattr(index_type, "value", index_type)).lower())
    if preset is IndexType.FLAT:
        return "Flat"
    if preset is IndexType.HNSW:
        return f"HNSW{HNSW_M}"
    if preset is IndexType.IVFPQ:
        if count < 256 * MIN_POINTS_PER_CENTROID:
            logger.warning(
                "ivfpq is meant for large corpora; %d documents train a coarse quantiser (fewer than 8 bits per "
                "sub-vector). flat is exact and small at this size.", count
            )
        # nlist ~ 4 sqrt(n) (FAISS guidelines), with enough points to train every centroid.
        nlist = max(1, min(round(4 * math.sqrt(count)), count // MIN_POINTS_PER_CENTROID))
        # m sub-quantizers of >= 4 dimensions each (m must divide the dimension), at most 64 bytes per vector.
        m = max((m for m in range(1, min(64, dimension // 4) + 1) if dimension % m == 0), default=1)
        # 8 bits (256 centroids per sub-quantizer) once there are enough points to train them.
        nbits = max(1, min(8, int(math.log2(max(2, min(count, TRAIN_SAMPLE) // MIN_POINTS_PER_CENTROID)))))
        return f"IVF{nlist},PQ{m}x{nbits}"
    return str(index_type)


def new_faiss_index(index_type: str, count: int, dimension: int, sample: Callable[[int], np.ndarray]):
    """An empty, trained FAISS index for `count` vectors; `sample(n)` returns n random rows to train on."""
    import faiss

    factory = resolve_factory(index_type, count, dimension)
    try:
        index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        presets = ", ".join(t.value for t in IndexType)
        raise ValueError(
            f"Index type {index_type!r} is neither a preset ({presets}) nor a valid FAISS factory string for "
            f"dimension {dimension} ({str(exc).strip().splitlines()[-1]})."
        ) from None
    hnsw = _find(index, "hnsw")
    if hnsw is not None:
        hnsw.efConstruction, hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
    if not index.is_trained:
        rows = sample(min(count, TRAIN_SAMPLE))
        logger.info("Training %s on %d of %d vectors", factory, len(rows), count)
        try:
            index.train(np.ascontiguousarray(rows, dtype=np.float32))
        except RuntimeError as exc:
            raise ValueError(f"Could not train {factory} on {len(rows)} vectors ({exc}); use flat or hnsw.") from None
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, max(8, ivf.nlist // 8), 64)  # lists visited per query; stored in the index file
    return index, factory


def _find(index, attribute: str):
    import faiss

    return getattr(faiss.downcast_index(index), attribute, None)


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def normalize(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32 rows scaled to unit length (all-zero rows stay zero), so that inner product = cosine."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    array = np.array(embeddings, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    np.divide(array, norms, out=array, where=norms > 0)
    return array


def model_fingerprint(model) -> tuple[str, str]:
    """(fingerprint, backbone fingerprint) of a SentenceTransformer; the backbone part is "" for non-SPT models.

    A suffix-prompt encoder is identified by its backbone's fingerprint, the soft prompt (hashed in full) and how
    it is applied; any other model by a strided sample of every weight. Both include the module types and the
    model's prompts, which change its embeddings as much as its weights do.
    """
    from spt_embed.model.module import SuffixPromptModule

    digest = hashlib.sha256()
    types = [f"{type(module).__module__}.{type(module).__qualname__}" for module in model]
    prompts = {name: text for name, text in (getattr(model, "prompts", None) or {}).items() if text}  # "" = none
    digest.update(json.dumps({"modules": types, "prompts": prompts}, sort_keys=True).encode())
    first = model[0]
    if isinstance(first, SuffixPromptModule):
        backbone = first.backbone_ref.fingerprint
        setup = {"backbone": backbone, "placement": first.spt_config.placement.value, "causal": first.is_causal}
        digest.update(json.dumps(setup, sort_keys=True).encode())
        digest.update(first.soft_prompt.detach().to(torch.float32).cpu().numpy().tobytes())
        return digest.hexdigest()[:16], backbone
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(flat[:: max(1, flat.numel() // 512)].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16], ""


@dataclass
class IndexMetadata:
    """What built an index; `index_meta.json`."""

    fingerprint: str = field(metadata={"help": "model_fingerprint() of the encoder that built the index."})
    dimension: int = field(metadata={"help": "Embedding width."})
    count: int = field(default=0, metadata={"help": "Number of documents."})
    model: str = field(default="", metadata={"help": "Model spec to reopen the encoder with (open_encoder)."})
    backbone_fingerprint: str = field(default="", metadata={"help": "SPT only: the frozen backbone's fingerprint."})
    index_type: str = field(default="flat", metadata={"help": "Preset (flat, hnsw, ivfpq) or factory string asked."})
    factory: str = field(default="Flat", metadata={"help": "The FAISS factory string actually built."})
    query_prompt: str | None = field(default=None, metadata={"help": "Text prepended to every query, never to docs."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype of the encoder; queries are encoded in it."})
    corpus: dict[str, Any] | None = field(default=None, metadata={"help": "CorpusSpec of the indexed file, if one."})
    spt_embed_version: str = field(default="", metadata={"help": "Library version that wrote the index."})
    faiss_version: str = field(default="", metadata={"help": "FAISS version that wrote the index."})
    created: str = field(default="", metadata={"help": "UTC time the index was written."})

    def __post_init__(self) -> None:
        if not isinstance(self.dimension, int) or self.dimension < 1:
            raise ValueError(f"dimension must be a positive integer, got {self.dimension!r}.")
        if not self.spt_embed_version:
            from spt_embed._version import __version__

            self.spt_embed_version = __version__

    def check_same_model(self, other: IndexMetadata, what: str, other_what: str) -> None:
        """ValueError unless both were built by the same model with the same query prompt."""
        for name in ("fingerprint", "dimension", "query_prompt"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(
                    f"{what} and {other_what} differ in {name}: {mine!r} (model {self.model!r}) vs {theirs!r} "
                    f"(model {other.model!r}); they must come from the same model and query prompt."
                )


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity (inner product of unit vectors; approximate for PQ indexes)


class Index:
    """A FAISS index with its document ids and metadata; `search` takes query texts or query embeddings."""

    def __init__(self, faiss_index, ids: Sequence[str], metadata: IndexMetadata, *, model=None, offsets=None):
        if faiss_index.ntotal != len(ids) or faiss_index.d != metadata.dimension:
            raise ValueError(
                f"Inconsistent index: FAISS holds {faiss_index.ntotal} vectors of dimension {faiss_index.d} but there "
                f"are {len(ids)} ids and the metadata says dimension {metadata.dimension}."
            )
        if offsets is not None and len(offsets) != len(ids):
            raise ValueError(f"{len(offsets)} corpus offsets for {len(ids)} ids.")
        self.faiss_index = faiss_index
        self.ids = list(ids)
        self.metadata = metadata
        self.metadata.count = len(self.ids)
        self.offsets = offsets
        self._model = None
        if model is not None:
            self.model = model

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Index({len(self)} documents, {self.metadata.factory}, dimension {self.metadata.dimension})"

    @property
    def model(self):
        """The query encoder: set one, or it is opened from metadata.model on first use; checked either way."""
        if self._model is None:
            if not self.metadata.model:
                raise ValueError("This index records no model spec; pass the model: load_index(path, model=...).")
            from spt_embed.model.encoder import open_encoder

            self.model = open_encoder(self.metadata.model, dtype=self.metadata.dtype)
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
        self._model = model

    def encode_queries(self, queries: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Unit-length query embeddings (the query prompt applied), shape (len(queries), dimension)."""
        for position, query in enumerate(queries):
            if not isinstance(query, str):
                raise TypeError(f"Query {position} is {type(query).__name__}, expected str.")
            if not query.strip():
                raise ValueError(f"Query {position} is empty; remove it or give it text.")
        embeddings = self.model.encode_query(
            list(queries), prompt=self.metadata.query_prompt, batch_size=batch_size, convert_to_numpy=True
        )
        return normalize(embeddings)

    def search(self, queries: str | Sequence[str] | np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits per query, best first. `queries`: texts (encoded here) or an (n, dimension) array.

        A k larger than the index is clamped to its size with a warning; approximate indexes may return fewer hits.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
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
        scores, positions = self.faiss_index.search(vectors, k)
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
        import faiss

        self.metadata.count = len(self)
        self.metadata.faiss_version = faiss.__version__
        self.metadata.created = datetime.now(timezone.utc).isoformat(timespec="seconds")

        def write(folder: Path) -> None:
            faiss.write_index(self.faiss_index, str(folder / INDEX_FILE))
            (folder / IDS_FILE).write_text(json.dumps(self.ids, ensure_ascii=False), encoding="utf-8")
            if self.offsets is not None:
                np.save(folder / OFFSETS_FILE, np.asarray(self.offsets, dtype=np.int64))
            meta = json.dumps(asdict(self.metadata), indent=2, ensure_ascii=False)
            (folder / META_FILE).write_text(meta + "\n", encoding="utf-8")

        return atomic_write_dir(Path(path), write, overwrite=overwrite, marker=META_FILE)


def atomic_write_dir(target: Path, write: Callable[[Path], None], *, overwrite: bool, marker: str) -> Path:
    """Let `write` fill a temporary folder next to `target`, then swap it in with renames.

    The previous folder is renamed to `.NAME.previous` for the instant between the two renames; load_index falls
    back to it should a crash happen exactly there. `marker` is a file every folder of this kind has: a folder
    without it is never replaced.
    """
    target = Path(target).expanduser()
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        if not (target / marker).is_file():
            raise FileExistsError(f"{target} exists and has no {marker}: refusing to replace a folder of another kind.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it private) so that the folder gets the usual permissions.
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        write(temporary)
        for file in temporary.iterdir():  # on disk before the rename makes them visible
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = _previous(target)
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
        os.replace(temporary, target)
        shutil.rmtree(previous)
    else:
        os.replace(temporary, target)
    return target


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is corrupted ({exc}).") from None


def read_metadata(folder: Path) -> IndexMetadata:
    data = _read_json(folder / META_FILE)
    known = {f.name for f in fields(IndexMetadata)}
    if not isinstance(data, dict) or sorted(set(data) - known):
        raise ValueError(f"{folder / META_FILE} is not index metadata written by this spt-embed version.")
    return IndexMetadata(**data)


def load_index(path: str | os.PathLike, *, model=None) -> Index:
    """An index folder written by Index.save / `spt-embed index`. `model` (optional) is checked against it."""
    import faiss

    folder = Path(path).expanduser()
    if not folder.exists() and (_previous(folder) / META_FILE).is_file():
        logger.warning("%s is missing but %s exists (a save was interrupted); loading that.", folder, _previous(folder))
        folder = _previous(folder)
    if not (folder / META_FILE).is_file():
        shard = (folder / "shard.json").is_file()
        hint = " It is a shard folder: combine shards with `spt-embed index-merge`." if shard else ""
        raise FileNotFoundError(f"{folder} is not an index folder (no {META_FILE}).{hint}")
    metadata = read_metadata(folder)
    ids = _read_json(folder / IDS_FILE)
    if not isinstance(ids, list) or not all(isinstance(doc_id, str) for doc_id in ids):
        raise ValueError(f"{folder / IDS_FILE} must be a JSON list of string ids.")
    offsets = np.load(folder / OFFSETS_FILE) if (folder / OFFSETS_FILE).is_file() else None
    return Index(faiss.read_index(str(folder / INDEX_FILE)), ids, metadata, model=model, offsets=offsets)


def check_unique_ids(ids: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for position, doc_id in enumerate(ids):
        if doc_id in seen:
            raise ValueError(f"Document id {doc_id!r} appears twice (positions {seen[doc_id]} and {position}).")
        seen[doc_id] = position


def index_from_embeddings(
    embeddings: np.ndarray, ids: Sequence[str], metadata: IndexMetadata, *, model=None, offsets=None, seed: int = 0
) -> Index:
    """An Index of `metadata.index_type` over precomputed (normalised here) embeddings."""
    vectors = normalize(embeddings)
    if len(vectors) != len(ids):
        raise ValueError(f"{len(vectors)} embeddings for {len(ids)} ids.")
    if not len(ids):
        raise ValueError("Cannot build an index over an empty corpus.")
    check_unique_ids(ids)
    rng = np.random.default_rng(seed)

    def sample(n: int) -> np.ndarray:
        return vectors[np.sort(rng.choice(len(vectors), n, replace=False))]

    faiss_index, metadata.factory = new_faiss_index(metadata.index_type, len(vectors), vectors.shape[1], sample)
    faiss_index.add(vectors)
    return Index(faiss_index, ids, metadata, model=model, offsets=offsets)


def build_index(
    model,
    texts: Sequence[str],
    ids: Sequence[str] | None = None,
    *,
    index_type: str = IndexType.FLAT.value,
    query_prompt: str | None = None,
    model_spec: str = "",
    batch_size: int = 32,
    show_progress_bar: bool = False,
) -> Index:
    """Encode `texts` (in memory) with `model` and index them; `ids` default to "0", "1", ...

    For corpora on disk, streamed and resumable, use spt_embed.index_corpus. `model_spec` is recorded so that a
    loaded index can reopen its model by itself.
    """
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
    from spt_embed.model.encoder import weights_dtype

    fingerprint, backbone = model_fingerprint(model)
    metadata = IndexMetadata(
        fingerprint=fingerprint,
        dimension=model.get_embedding_dimension(),
        model=model_spec,
        backbone_fingerprint=backbone,
        index_type=str(getattr(index_type, "value", index_type)),
        query_prompt=query_prompt,
        dtype=weights_dtype(model),
    )
    embeddings = model.encode_document(
        texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=show_progress_bar
    )
    return index_from_embeddings(embeddings, ids, metadata, model=model)
