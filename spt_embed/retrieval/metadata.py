"""What index and shard folders hold: their file names and the JSON records of how they were made.

Kept free of torch and faiss, so that the command line can name the choices and defaults cheaply.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spt_embed.atomic import write_text
from spt_embed.recipe import parse_enum
from spt_embed.retrieval.corpus import Shard
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.precision import DEFAULT_RESCORE_MULTIPLIER, Precision, check_rescore_multiplier

# An index folder (see spt_embed.retrieval.index).
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"  # on-disk inverted lists of an IVF index (see spt_embed.retrieval.ondisk)
IDS_FILE = "ids.json"
OFFSETS_FILE = "offsets.npy"
META_FILE = "index_meta.json"
# A shard folder (see spt_embed.retrieval.shards).
SHARD_FILE = "shard.json"
PARTS_DIR = "parts"
DEFAULT_BLOCK_SIZE = 1024


class OnDuplicate(str, enum.Enum):
    ERROR = "error"  # stop, naming the id and where both copies are
    KEEP_FIRST = "keep-first"  # keep the first copy (file order; shard order in a merge), log the others


def _stamp_version(record: Any) -> None:
    if not record.spt_embed_version:
        from spt_embed._version import __version__

        record.spt_embed_version = __version__


@dataclass
class IndexMetadata:
    """What built an index; `index_meta.json`."""

    fingerprint: str = field(metadata={"help": "model_fingerprint() of the encoder that built the index."})
    dimension: int = field(metadata={"help": "Embedding width."})
    count: int = field(default=0, metadata={"help": "Number of documents."})
    skipped_empty: int = field(default=0, metadata={"help": "Corpus documents left out because they have no text."})
    model: str = field(default="", metadata={"help": "Model spec to reopen the encoder with (open_encoder)."})
    backbone_fingerprint: str = field(default="", metadata={"help": "SPT only: the frozen backbone's fingerprint."})
    index_type: str = field(default="flat", metadata={"help": "Preset (flat, hnsw, ivfpq) or factory string asked."})
    factory: str = field(default="Flat", metadata={"help": "The FAISS factory string actually built."})
    ivfdata: str = field(
        default="",
        metadata={"help": "On-disk IVF: the file of this folder holding the inverted lists, memory-mapped at search "
                          "time; empty when index.faiss holds everything."},
    )
    query_prompt: str | None = field(default=None, metadata={"help": "Text prepended to every query, never to docs."})
    prompt_routes: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "SPT with task prompts: the soft prompt documents and queries go through (prompt_routes)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype of the encoder; queries are encoded in it."})
    backend: str = field(
        default="torch",
        metadata={"help": "What runs the encoder: torch, or the onnx / openvino file of an export; queries use it too."},
    )
    precision: str = field(
        default=Precision.FLOAT32.value,
        metadata={"help": "How document vectors are stored: float32, int8 (1 byte per dimension) or binary (1 bit)."},
    )
    rescore_multiplier: int = field(
        default=DEFAULT_RESCORE_MULTIPLIER,
        metadata={"help": "int8/binary: candidates per hit rescored with the float query (0: none); search default."},
    )
    bytes_per_vector: int | None = field(
        default=None, metadata={"help": "Bytes one document vector takes in index.faiss (set when saved)."}
    )
    calibration: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "int8: how the per-dimension ranges were calibrated (sample size, seed, file of ranges)."},
    )
    corpus: dict[str, Any] | None = field(default=None, metadata={"help": "CorpusSpec of the indexed file, if one."})
    spt_embed_version: str = field(default="", metadata={"help": "Library version that wrote the index."})
    faiss_version: str = field(default="", metadata={"help": "FAISS version that wrote the index."})
    created: str = field(default="", metadata={"help": "UTC time the index was written."})

    def __post_init__(self) -> None:
        if not isinstance(self.dimension, int) or self.dimension < 1:
            raise ValueError(f"dimension must be a positive integer, got {self.dimension!r}.")
        self.precision = parse_enum(Precision, self.precision, "precision").value
        check_rescore_multiplier(self.rescore_multiplier)
        _stamp_version(self)

    def check_same_model(self, other: IndexMetadata, what: str, other_what: str) -> None:
        """ValueError unless both were built by the same model with the same query prompt."""
        for name in ("fingerprint", "dimension", "query_prompt", "prompt_routes"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(
                    f"{what} and {other_what} differ in {name}: {mine!r} (model {self.model!r}) vs {theirs!r} "
                    f"(model {other.model!r}); they must come from the same model and query prompt."
                )


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
    prompt_routes: dict[str, str] = field(
        default_factory=dict, metadata={"help": "SPT with task prompts: the soft prompt of documents and queries."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype of the encoder (resume in the same)."})
    backend: str = field(default="torch", metadata={"help": "torch, or the exported onnx / openvino file that ran."})
    index_type: str = field(default=IndexType.FLAT.value, metadata={"help": "Index type the merge builds by default."})
    precision: str = field(default=Precision.FLOAT32.value, metadata={"help": "Precision the merge stores by default."})
    rescore_multiplier: int = field(
        default=DEFAULT_RESCORE_MULTIPLIER, metadata={"help": "Rescore multiplier the merged index records by default."}
    )
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata={"help": "Documents per part (resume granularity)."})
    on_duplicate: str = field(default=OnDuplicate.ERROR.value, metadata={"help": "error or keep-first."})
    complete: bool = field(default=False, metadata={"help": "True once every part is written."})
    count: int = field(default=0, metadata={"help": "Documents in the shard (once complete)."})
    parts: int = field(default=0, metadata={"help": "Number of parts (once complete)."})
    skipped_empty: int = field(default=0, metadata={"help": "Documents left out because they have no text."})
    spt_embed_version: str = field(default="", metadata={"help": "Library version that wrote the shard."})

    def __post_init__(self) -> None:
        Shard.parse(self.shard)
        self.precision = parse_enum(Precision, self.precision, "precision").value
        check_rescore_multiplier(self.rescore_multiplier)
        self.on_duplicate = parse_enum(OnDuplicate, self.on_duplicate, "on_duplicate").value
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}.")
        _stamp_version(self)

    def save(self, folder: Path) -> None:
        write_text(folder / SHARD_FILE, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")

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
        return index_metadata_from(self, index_type)


def index_metadata_from(record, index_type: str) -> IndexMetadata:
    """The IndexMetadata of an index built from the embeddings `record` describes (a ShardMetadata, or the
    EmbeddingsMetadata of a folder of parquet blocks): the model, prompt, corpus and dtype fields they share."""
    return IndexMetadata(
        fingerprint=record.fingerprint,
        dimension=record.dimension,
        model=record.model,
        backbone_fingerprint=record.backbone_fingerprint,
        index_type=index_type,
        query_prompt=record.query_prompt,
        prompt_routes=record.prompt_routes,
        corpus=record.corpus,
        dtype=record.dtype,
        backend=getattr(record, "backend", "torch"),
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is corrupted ({exc}).") from None


def read_metadata(folder: Path) -> IndexMetadata:
    data = read_json(folder / META_FILE)
    known = {f.name for f in fields(IndexMetadata)}
    if not isinstance(data, dict) or sorted(set(data) - known):
        raise ValueError(f"{folder / META_FILE} is not index metadata written by this spt-embed version.")
    return IndexMetadata(**data)
