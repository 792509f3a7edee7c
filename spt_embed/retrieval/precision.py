"""Compressed document vectors: int8 (one byte per dimension) and binary (one bit per dimension) FAISS indexes.

Documents are quantised with sentence-transformers' ``quantize_embeddings`` and searched as its
``semantic_search_faiss`` does: the first pass over-fetches ``k * rescore_multiplier`` candidates from the compressed
index, then the candidates are rescored with the full-precision query against their stored (compressed) vectors.

- ``int8``: per-dimension ranges (min, max) are calibrated on a seeded sample of the documents, each value is cut
  into 256 buckets (``quantize_embeddings(..., "uint8", ranges)``, the int8 codes plus 128) and stored in a FAISS
  scalar-quantiser index (``SQ8``; ``HNSW32,SQ8``) whose ranges are the calibrated ones, so it decodes each code to
  its bucket centre. FAISS compares the float query with the decoded documents, so the first pass already scores
  as rescoring does; over-fetching adds candidates only where the graph search (hnsw) is approximate.
- ``binary``: the sign of each dimension (``quantize_embeddings(..., "ubinary")``) in a FAISS binary index
  (``BFlat``; ``BHNSW32``) searched by Hamming distance with the query's own signs. A first-pass score is the
  cosine of the two sign vectors, 1 - 2 * hamming / dimension; a rescored one is the cosine of the float query with
  the document's sign vector. Both rank the candidates as sentence-transformers' 0/1 rescoring does.
- ``binary-int8``: the binary index above for the first pass, plus an int8 copy of every document (the ``SQ8``
  index of ``int8``, calibrated the same way) that only rescoring reads: the pipeline of sentence-transformers'
  quantisation guide (binary search in memory, int8 rescoring vectors on disk). The int8 copy is written as
  ``rescore_int8.faiss`` and memory-mapped when the index is loaded, so memory holds dimension / 8 bytes per
  vector and the disk dimension / 8 + dimension; a search reads k * rescore_multiplier int8 rows per query.

Only flat and hnsw hold compressed vectors: ivfpq and PQ factory strings compress the vectors themselves.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from spt_embed.recipe import enum_text, parse_enum
from spt_embed.retrieval.faiss_factory import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    IndexType,
    import_faiss,
    new_faiss_index,
)

if TYPE_CHECKING:
    import numpy as np

    from spt_embed.retrieval.metadata import IndexMetadata

logger = logging.getLogger(__name__)

# Candidates fetched per hit before rescoring: what sentence-transformers' quantization examples pass to
# semantic_search_faiss (the function's own default is 2). 0 turns rescoring off.
DEFAULT_RESCORE_MULTIPLIER = 4
# At most this many documents (a seeded random sample) calibrate the int8 ranges.
CALIBRATION_SAMPLE = 100_000
# sentence-transformers warns that int8 ranges from fewer embeddings than this are unstable.
MIN_CALIBRATION = 100
# Width given to a dimension whose calibration sample holds one value, so that its bucket size is not zero.
MIN_RANGE = 1e-6
RANGES_FILE = "int8_ranges.npy"


class Precision(str, enum.Enum):
    """How document vectors are stored in the index."""

    FLOAT32 = "float32"  # 4 bytes per dimension, exact
    INT8 = "int8"  # 1 byte per dimension: calibrated per-dimension buckets
    BINARY = "binary"  # 1 bit per dimension: the sign
    BINARY_INT8 = "binary-int8"  # binary in memory, rescored from an int8 copy memory-mapped from disk


BINARY_PRECISIONS = (Precision.BINARY, Precision.BINARY_INT8)  # searched in a FAISS binary index
CALIBRATED_PRECISIONS = (Precision.INT8, Precision.BINARY_INT8)  # quantised to int8 with calibrated ranges

_FACTORIES = {
    (Precision.INT8, IndexType.FLAT): "SQ8",
    (Precision.INT8, IndexType.HNSW): f"HNSW{HNSW_M},SQ8",
    (Precision.BINARY, IndexType.FLAT): "BFlat",
    (Precision.BINARY, IndexType.HNSW): f"BHNSW{HNSW_M}",
    (Precision.BINARY_INT8, IndexType.FLAT): "BFlat",
    (Precision.BINARY_INT8, IndexType.HNSW): f"BHNSW{HNSW_M}",
}
RESCORE_FACTORY = "SQ8"  # the int8 rescoring copy of a binary-int8 index
RESCORE_FILE = "rescore_int8.faiss"


class BinaryInt8Index:
    """A binary-int8 index: the FAISS binary index that is searched, and the int8 (SQ8) index of the same vectors,
    row for row, that rescoring reads. `ntotal` and `d` are the binary index's, as for a plain binary index."""

    def __init__(self, binary, int8):
        if binary.ntotal != int8.ntotal:
            raise ValueError(
                f"Inconsistent binary-int8 index: {binary.ntotal} binary vectors but {int8.ntotal} int8 rescoring "
                f"vectors. Rebuild the index."
            )
        self.binary, self.int8 = binary, int8

    @property
    def ntotal(self) -> int:
        return self.binary.ntotal

    @property
    def d(self) -> int:
        return self.binary.d


def check_precision(precision: Precision | str, index_type: str) -> Precision:
    """The precision as a member; ValueError if it is unknown or `index_type` cannot hold it (checked before any
    encoding, so that a refused combination costs no work)."""
    precision = parse_enum(Precision, enum_text(precision).lower(), "precision")
    if precision is Precision.FLOAT32:
        return precision
    preset = {t.value: t for t in IndexType}.get(enum_text(index_type).lower())
    if (precision, preset) not in _FACTORIES:
        what = "binary vectors need a FAISS binary index" if precision in BINARY_PRECISIONS else (
            "int8 vectors need a FAISS scalar-quantiser index"
        )
        raise ValueError(
            f"precision {precision.value!r} cannot be used with index type {enum_text(index_type)!r}: {what}, built "
            f"for the flat and hnsw index types only (an ivfpq or PQ index already compresses its vectors; other "
            f"factory strings build float32 indexes). "
            f"Use --index-type flat or hnsw with --precision {precision.value} (Python: index_type='flat'), or "
            f"--precision float32 with {enum_text(index_type)!r}."
        )
    return precision


def check_rescore_multiplier(multiplier: int) -> int:
    if isinstance(multiplier, bool) or not isinstance(multiplier, int) or multiplier < 0:
        raise ValueError(
            f"rescore_multiplier must be a non-negative integer (0: no rescoring), got {multiplier!r}."
        )
    return multiplier


def calibrate(sample: np.ndarray) -> np.ndarray:
    """Per-dimension int8 ranges, shape (2, dimension): the sample's min and max, as sentence-transformers
    calibrates them. A dimension with a single value gets a width of MIN_RANGE."""
    import numpy as np

    if len(sample) < MIN_CALIBRATION:
        logger.warning(
            "int8 ranges calibrated on %d documents; they are more stable from at least %d.", len(sample),
            MIN_CALIBRATION,
        )
    low, high = sample.min(axis=0), sample.max(axis=0)
    high = np.where(high > low, high, low + MIN_RANGE)
    return np.vstack([low, high]).astype(np.float32)


def new_quantised_index(precision: Precision, index_type: str, dimension: int, ranges: np.ndarray | None):
    """An empty FAISS index holding `precision` vectors of `dimension`, and its factory string."""
    import numpy as np

    faiss = import_faiss()
    preset = IndexType(enum_text(index_type).lower())
    factory = _FACTORIES[(precision, preset)]
    # The factories return the concrete classes (IndexScalarQuantizer, IndexHNSWSQ, IndexBinaryFlat, IndexBinaryHNSW).
    if precision in BINARY_PRECISIONS:
        index = faiss.index_binary_factory(binary_bits(dimension), factory)
    else:
        index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
        # The scalar quantiser's min-max training on the two rows (low, high) sets exactly the calibrated ranges.
        index.train(np.ascontiguousarray(ranges, dtype=np.float32))
    if preset is IndexType.HNSW:
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
    if precision is Precision.BINARY_INT8:
        rescore, _ = new_quantised_index(Precision.INT8, IndexType.FLAT.value, dimension, ranges)
        return BinaryInt8Index(index, rescore), f"{factory} + {RESCORE_FACTORY} rescoring"
    return index, factory


def binary_bits(dimension: int) -> int:
    """Bits a binary vector of `dimension` takes: packbits pads to whole bytes."""
    return 8 * ((dimension + 7) // 8)


def add_quantised(index, precision: Precision, vectors: np.ndarray, ranges: np.ndarray | None) -> None:
    """Quantise unit-length float32 `vectors` (n, dimension) and add them to `index`."""
    from sentence_transformers.util import quantize_embeddings

    if precision is Precision.BINARY_INT8:
        add_quantised(index.binary, Precision.BINARY, vectors, None)
        add_quantised(index.int8, Precision.INT8, vectors, ranges)
        return
    if precision is Precision.BINARY:
        index.add(quantize_embeddings(vectors, precision="ubinary"))  # (n, dimension / 8) uint8
        return
    codes = quantize_embeddings(vectors, precision="uint8", ranges=ranges)  # (n, dimension)
    # FAISS encodes floats itself; handed each code's bucket centre, it stores exactly quantize_embeddings' code.
    index.add(bucket_centres(codes, ranges))


def bucket_centres(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """The float32 value in the middle of each uint8 code's bucket (what the scalar quantiser decodes codes to)."""
    import numpy as np

    step = (ranges[1] - ranges[0]) / 255
    return (ranges[0] + (codes.astype(np.float32) + 0.5) * step).astype(np.float32)


def search_quantised(
    index, precision: Precision, queries: np.ndarray, k: int, rescore_multiplier: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and positions (n, k), best first, position -1 where fewer than k were found.

    `queries`: unit-length float32 (n, dimension). With a multiplier > 0, k * multiplier candidates (at most the
    index size) are fetched and rescored with the float queries against their stored vectors."""
    import numpy as np
    from sentence_transformers.util import quantize_embeddings

    dimension = queries.shape[1]
    fetch = min(index.ntotal, k * max(1, rescore_multiplier))
    if precision in BINARY_PRECISIONS:
        searched = index.binary if precision is Precision.BINARY_INT8 else index
        hamming, positions = searched.search(quantize_embeddings(queries, precision="ubinary"), fetch)
        scores = 1 - 2 * hamming.astype(np.float32) / dimension
    else:
        scores, positions = index.search(queries, fetch)
    if rescore_multiplier > 0:
        found = positions >= 0
        stored = stored_vectors(index, precision, np.where(found, positions, 0).ravel(), dimension)
        scores = np.einsum("qd,qcd->qc", queries, stored.reshape(*positions.shape, dimension))  # (n, fetch)
        scores[~found] = -np.inf  # a padding slot never outranks a real candidate
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(positions, order, axis=1)


def stored_vectors(index, precision: Precision, positions: np.ndarray, dimension: int) -> np.ndarray:
    """Float32 (len(positions), dimension) vectors as rescoring reads them: int8 (and the int8 copy of binary-int8)
    decoded to bucket centres, binary as unit-length sign vectors (+-1 / sqrt(dimension))."""
    import numpy as np

    if precision is Precision.BINARY_INT8:
        index, precision = index.int8, Precision.INT8
    if precision is Precision.INT8:
        return index.reconstruct_batch(np.ascontiguousarray(positions, dtype=np.int64))
    # FAISS binary indexes reconstruct one vector at a time; each distinct candidate is read once.
    unique, inverse = np.unique(positions, return_inverse=True)
    packed = np.stack([index.reconstruct(int(position)) for position in unique])[inverse]  # (n, dimension / 8)
    bits = np.unpackbits(packed, axis=1)[:, :dimension].astype(np.float32)  # packbits' padding trimmed
    return (2 * bits - 1) / np.sqrt(dimension, dtype=np.float32)


def code_size(index) -> int | None:
    """Bytes one vector takes in `index` (its code; HNSW links and ids not counted); None if FAISS does not say."""
    faiss = import_faiss()
    if isinstance(index, BinaryInt8Index):  # what memory holds; the int8 copy is mapped from disk
        return code_size(index.binary)
    if isinstance(index, faiss.IndexBinary):
        return int(index.code_size)
    index = faiss.downcast_index(index)
    for wrapped in ("storage", "index"):  # HNSW's vector storage; the index inside a pre-transform or id map
        inner = getattr(index, wrapped, None)
        if inner is not None:
            return code_size(inner)
    size = getattr(index, "code_size", None)
    return None if size is None else int(size)


def write_faiss(index, path: str) -> None:
    """Write `index` to `path`; a binary-int8 index writes its int8 copy beside it, as RESCORE_FILE."""
    faiss = import_faiss()
    if isinstance(index, BinaryInt8Index):
        faiss.write_index(index.int8, str(Path(path).with_name(RESCORE_FILE)))
        index = index.binary
    (faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else faiss.write_index)(index, path)


def read_faiss(path: str, precision: Precision | str):
    """Read what write_faiss wrote; a binary-int8 index's int8 copy is memory-mapped (IO_FLAG_MMAP_IFC), not read.
    A missing or damaged file raises RuntimeError (faiss's own error)."""
    faiss = import_faiss()
    precision = parse_enum(Precision, precision, "precision")
    if precision is Precision.BINARY_INT8:
        rescore = Path(path).with_name(RESCORE_FILE)
        if not rescore.is_file():
            raise RuntimeError(f"the int8 rescoring vectors {rescore.name} are missing")
        return BinaryInt8Index(faiss.read_index_binary(path), faiss.read_index(str(rescore), faiss.IO_FLAG_MMAP_IFC))
    return (faiss.read_index_binary if precision is Precision.BINARY else faiss.read_index)(path)


def new_index(metadata: IndexMetadata, count: int, sample: Callable[[int], np.ndarray], seed: int = 0):
    """An empty FAISS index of `metadata.index_type` and `metadata.precision` for `count` vectors, and the int8
    ranges (None for other precisions). `sample(n)` returns n random rows (seeded by `seed`, recorded): they train
    an IVF/PQ index or calibrate int8. Sets `metadata.factory` and, for int8, `metadata.calibration`."""
    precision = check_precision(metadata.precision, metadata.index_type)
    if precision is Precision.FLOAT32:
        index, metadata.factory = new_faiss_index(metadata.index_type, count, metadata.dimension, sample)
        return index, None
    ranges = None
    if precision in CALIBRATED_PRECISIONS:
        rows = sample(min(count, CALIBRATION_SAMPLE))
        ranges = calibrate(rows)
        metadata.calibration = {
            "method": "per-dimension min and max of a random sample", "sample": len(rows), "seed": seed,
            "file": RANGES_FILE,
        }
        logger.info("int8 ranges calibrated on %d of %d documents", len(rows), count)
    index, metadata.factory = new_quantised_index(precision, metadata.index_type, metadata.dimension, ranges)
    return index, ranges


def add_vectors(index, precision: Precision | str, vectors: np.ndarray, ranges: np.ndarray | None) -> None:
    """Add unit-length float32 `vectors` (n, dimension) to an index made by new_index, quantised as it stores them."""
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if parse_enum(Precision, precision, "precision") is Precision.FLOAT32:
        index.add(vectors)
    else:
        add_quantised(index, Precision(precision), vectors, ranges)
