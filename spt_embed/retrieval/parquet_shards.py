"""A folder of embeddings as parquet blocks (what `encode_corpus_ray` writes), and the index built from it.

    embeddings.json        EmbeddingsMetadata: model fingerprint, prompt routes, dimension, corpus, precision, ...
    blocks/000000.parquet  one block of the corpus: columns id (string), record, offset (int64) and
    blocks/000001.parquet  embedding (fixed-size list of float32, unit length); the footer holds the block's digest
    ...

Block b holds the documents b * block_size ... (b + 1) * block_size - 1 of the corpus (documents as the corpus
readers yield them, in file order), less those with no text and repeated ids, exactly as a part of a one-machine
shard folder does (spt_embed.retrieval.shards); its digest is the same `block_digest`. Each block file is written
atomically, so a block is either whole or absent, and a rerun keeps every block whose digest the corpus still gives.
Only pyarrow is needed here: the index can be built from a folder on a machine without Ray.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from spt_embed.atomic import atomic_file, write_text
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.metadata import DEFAULT_BLOCK_SIZE, IndexMetadata, OnDuplicate, index_metadata_from

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.json"
BLOCKS_DIR = "blocks"
DIGEST_KEY = b"spt_embed.digest"  # parquet footer key of a block's digest
PRECISION = "float32"  # how the embeddings are stored


@dataclass
class EmbeddingsMetadata:
    """`embeddings.json`: how a folder of parquet blocks was made; all of it but the index settings must match to
    resume (index_type and query_prompt only matter when the index is built)."""

    fingerprint: str = field(metadata={"help": "model_fingerprint() of the encoder."})
    dimension: int = field(metadata={"help": "Embedding width."})
    corpus: dict[str, Any] = field(metadata={"help": "CorpusSpec of the corpus file (absolute path)."})
    model: str = field(default="", metadata={"help": "Model spec every worker opened the encoder from."})
    backbone_fingerprint: str = field(default="", metadata={"help": "SPT only: the backbone's fingerprint."})
    prompt_routes: dict[str, str] = field(
        default_factory=dict, metadata={"help": "SPT with task prompts: the soft prompt of documents and queries."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype of the encoder (queries use the same)."})
    precision: str = field(default=PRECISION, metadata={"help": "Storage precision of the embeddings."})
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata={"help": "Documents per block (resume granularity)."})
    on_duplicate: str = field(default=OnDuplicate.ERROR.value, metadata={"help": "error or keep-first."})
    index_type: str = field(default=IndexType.FLAT.value, metadata={"help": "Index type built from the blocks."})
    query_prompt: str | None = field(default=None, metadata={"help": "Query prompt the index will apply."})
    complete: bool = field(default=False, metadata={"help": "True once every block is written."})
    blocks: int = field(default=0, metadata={"help": "Number of blocks (once complete)."})
    count: int = field(default=0, metadata={"help": "Documents in all blocks (once complete)."})
    skipped_empty: int = field(default=0, metadata={"help": "Documents left out because they have no text."})
    spt_embed_version: str = field(default="", metadata={"help": "Library version that wrote the folder."})

    # The settings that decide what a block holds: a folder is resumed only if all of them match.
    RESUME_KEYS = ("fingerprint", "dimension", "dtype", "precision", "prompt_routes", "corpus", "block_size",
                   "on_duplicate")

    def __post_init__(self) -> None:
        if not isinstance(self.dimension, int) or self.dimension < 1:
            raise ValueError(f"dimension must be a positive integer, got {self.dimension!r}.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}.")
        if self.precision != PRECISION:
            raise ValueError(f"precision {self.precision!r} is not supported here; blocks hold {PRECISION}.")
        if not self.spt_embed_version:
            from spt_embed._version import __version__

            self.spt_embed_version = __version__

    def save(self, folder: Path) -> None:
        write_text(Path(folder) / EMBEDDINGS_FILE, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EmbeddingsMetadata:
        path = Path(folder) / EMBEDDINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a folder of parquet embeddings (no {EMBEDDINGS_FILE}); it is written by "
                f"`spt-embed index --engine ray --keep-parts` or spt_embed.encode_corpus_ray."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{key: value for key, value in data.items() if key in {f.name for f in fields(cls)}})
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is corrupted ({exc}).") from None

    def mismatch(self, wanted: EmbeddingsMetadata) -> str | None:
        """The first setting that makes these blocks unusable for `wanted`, as 'name=found, not wanted'."""
        for name in self.RESUME_KEYS:
            if getattr(self, name) != getattr(wanted, name):
                return f"{name}={getattr(self, name)!r}, not {getattr(wanted, name)!r}"
        return None

    def index_metadata(self, index_type: str) -> IndexMetadata:
        metadata = index_metadata_from(self, index_type)
        metadata.skipped_empty = self.skipped_empty
        return metadata


def block_path(folder: Path, number: int) -> Path:
    return Path(folder) / BLOCKS_DIR / f"{number:06d}.parquet"


def write_block(
    folder: Path, number: int, ids: list[str], records: np.ndarray, offsets: np.ndarray, embeddings: np.ndarray,
    digest: str,
) -> None:
    """Block `number` as one parquet file, written atomically (a killed writer leaves no partial block)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows, dimension = embeddings.shape
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.string()),
            "record": pa.array(records, type=pa.int64()),
            "offset": pa.array(offsets, type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dimension),
        }
    ).replace_schema_metadata({DIGEST_KEY: digest.encode()})
    with atomic_file(block_path(folder, number), "wb") as handle:
        pq.write_table(table, handle)


def stored_block(folder: Path, number: int) -> tuple[str, int] | None:
    """(digest, rows) from block `number`'s footer; None if the file is absent, truncated or not a block."""
    import pyarrow.parquet as pq

    path = block_path(folder, number)
    if not path.is_file():
        return None
    try:
        footer = pq.ParquetFile(path).metadata
    except Exception:  # pyarrow's errors for a damaged file vary (ArrowInvalid, OSError)
        logger.warning("%s is unreadable; it is encoded again.", path)
        return None
    digest = (footer.metadata or {}).get(DIGEST_KEY)
    return None if digest is None else (digest.decode(), footer.num_rows)


def read_block(path: Path, dimension: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, offsets, embeddings (rows, dimension) float32) of one block file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "offset", "embedding"])
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    embeddings = vectors.astype(np.float32, copy=False).reshape(-1, dimension)
    return table.column("id").to_pylist(), table.column("offset").to_numpy(), embeddings


def list_blocks(folder: str | os.PathLike, meta: EmbeddingsMetadata | None = None) -> list[Path]:
    """The block files of a complete folder, in order; an incomplete folder or a missing block is an error."""
    folder = Path(folder)
    meta = meta or EmbeddingsMetadata.load(folder)
    if not meta.complete:
        raise ValueError(f"{folder} is incomplete: rerun the command that wrote it (finished blocks are kept).")
    paths = [block_path(folder, number) for number in range(meta.blocks)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise ValueError(
            f"{folder} lacks block(s) {', '.join(missing[:5])}: rerun the command that wrote it to encode them again."
        )
    return paths


def index_from_parquet(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    *,
    index_type: str | None = None,
    precision: str = "float32",
    rescore_multiplier: int | None = None,
    overwrite: bool = False,
    model=None,
    seed: int = 0,
):
    """Build and save (at `output`) an index from a complete folder of parquet blocks; returns the Index.

    `index_type`: default the one recorded in the folder. The vectors are added block by block; a trained type
    (ivfpq, IVF...) is trained first on a random sample of them, and int8 calibrated on one (`precision`, see
    spt_embed.retrieval.precision).
    """
    from spt_embed.recipe import enum_text
    from spt_embed.retrieval.index import Index, check_unique_ids
    from spt_embed.retrieval.precision import (
        DEFAULT_RESCORE_MULTIPLIER,
        add_vectors,
        check_precision,
        check_rescore_multiplier,
        new_index,
    )

    folder = Path(folder)
    meta = EmbeddingsMetadata.load(folder)
    paths = list_blocks(folder, meta)
    index_type = enum_text(index_type or meta.index_type)
    precision = check_precision(precision, index_type)
    rescore_multiplier = check_rescore_multiplier(
        DEFAULT_RESCORE_MULTIPLIER if rescore_multiplier is None else rescore_multiplier
    )
    stored = [stored_block(folder, number) for number in range(len(paths))]
    damaged = [path.name for path, block in zip(paths, stored) if block is None]
    if damaged:
        raise ValueError(f"{folder}: block(s) {', '.join(damaged[:5])} are damaged; rerun the command that wrote them.")
    sizes = [rows for _, rows in stored]
    total = sum(sizes)
    if not total:
        empty = f"; {meta.skipped_empty} document(s) with no text were skipped" if meta.skipped_empty else ""
        raise ValueError(f"{folder} holds no documents{empty}.")
    rng = np.random.default_rng(seed)

    def sample(n: int) -> np.ndarray:
        chosen, rows, start = np.sort(rng.choice(total, size=n, replace=False)), [], 0
        for path, size in zip(paths, sizes):
            local = chosen[(chosen >= start) & (chosen < start + size)] - start
            if len(local):
                rows.append(read_block(path, meta.dimension)[2][local])
            start += size
        return np.concatenate(rows)

    metadata = meta.index_metadata(index_type)
    metadata.precision, metadata.rescore_multiplier = precision.value, rescore_multiplier
    faiss_index, ranges = new_index(metadata, total, sample, seed)
    ids: list[str] = []
    offsets = []
    for path in tqdm(paths, desc="add to index", unit="block", disable=len(paths) < 2):
        block_ids, block_offsets, embeddings = read_block(path, meta.dimension)
        add_vectors(faiss_index, precision, embeddings, ranges)
        ids.extend(block_ids)
        offsets.append(block_offsets)
    check_unique_ids(ids)  # the blocks were planned without repeats; this guards against mixed folders
    index = Index(
        faiss_index, ids, metadata, model=model, offsets=np.concatenate(offsets).astype(np.int64), ranges=ranges
    )
    index.save(output, overwrite=overwrite)
    logger.info(
        "Wrote %s: %d documents, %s, %s, from %d block(s) in %s.", output, len(index), metadata.factory,
        precision.value, len(paths), folder,
    )
    return index
