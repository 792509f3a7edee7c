"""FAISS index types: the named presets, their factory strings sized for a corpus, and building a trained,
empty FAISS index. faiss and numpy load only when an index is built, so the CLI can list the presets cheaply."""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from spt_embed.recipe import enum_text

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

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


def import_faiss():
    """The faiss module. Its loader logs at INFO, on every import, each CPU-specific build it tries and fails to
    find ("No module named 'faiss.swigfaiss_avx512'"): normal on most machines, so kept out of the log unless
    the caller has set that logger's level itself."""
    loader_log = logging.getLogger("faiss.loader")
    if loader_log.level == logging.NOTSET:
        loader_log.setLevel(logging.WARNING)
    import faiss

    return faiss


def resolve_factory(index_type: str, count: int, dimension: int) -> str:
    """The FAISS factory string for a preset (sized for `count` vectors) or a factory string as it is."""
    preset = {t.value: t for t in IndexType}.get(enum_text(index_type).lower())
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
    import numpy as np

    faiss = import_faiss()
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
    faiss = import_faiss()
    return getattr(faiss.downcast_index(index), attribute, None)


def _ivf(index):
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
