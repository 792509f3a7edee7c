"""IVF indexes whose inverted lists live on disk: built shard by shard and merged the FAISS way.

This is the method of FAISS's "indexes that do not fit in RAM" (demo_ondisk_ivf.py): the coarse quantiser (and
PQ / SQ) is trained once; each shard's vectors go into a copy of that empty trained index, written as a block
index; `faiss.contrib.ondisk.merge_ondisk` then concatenates the blocks' inverted lists, list by list, into one
file. Only one shard's codes are in memory while the blocks are built, and the merge reads the blocks memory-mapped.

In an index folder the lists are ``index.ivfdata`` beside ``index.faiss`` (quantiser, list sizes and offsets). FAISS
stores the lists file's path inside ``index.faiss``; it is written here as the bare file name, and `read_faiss_index`
points it at the folder being read, so a folder written under a temporary name and renamed, or moved or copied
elsewhere later, still finds its lists. The lists file is memory-mapped read-only at search time: the pages of the
probed lists are read on demand into the page cache, which the OS can evict under memory pressure, rather than
copied into the process's heap.

IVF-Flat, IVF-PQ and IVF-SQ indexes (optionally behind a pre-transform such as PCA) are merged this way;
flat, HNSW and the other IVF variants are built in memory (spt_embed.retrieval.indexing decides with
`can_merge_ondisk`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spt_embed.retrieval.faiss_factory import import_faiss
from spt_embed.retrieval.metadata import INDEX_FILE, IVFDATA_FILE

logger = logging.getLogger(__name__)

BLOCKS_DIR = ".blocks"  # per-shard block indexes, inside the folder being written, deleted after the merge


def _ivf(faiss_index):
    """The IndexIVF inside `faiss_index` (itself, or under a pre-transform such as PCA), else None."""
    faiss = import_faiss()
    index = faiss.downcast_index(faiss_index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexIVF) else None


def can_merge_ondisk(faiss_index) -> bool:
    """True for IVF-Flat, IVF-PQ and IVF-SQ (optionally behind a pre-transform): lists of one fixed-size code per
    vector, which `merge_ondisk` writes as OnDiskInvertedLists. The other IVF variants are built in memory: fast-scan
    indexes pack codes in blocks of 32 vectors, IVFPQR keeps a second code per vector, Dedup a side table, and the
    additive-quantiser ones (RQ, LSQ, ...) are not covered by the tests of the on-disk path."""
    faiss = import_faiss()
    ivf = _ivf(faiss_index)
    # Exact classes (downcast_index gives the most derived one): subclasses such as IVFPQR store more per vector.
    return type(ivf) in (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)


def ondisk_lists(faiss_index):
    """The OnDiskInvertedLists of `faiss_index`, or None when its lists are in memory (or it is not an IVF)."""
    faiss = import_faiss()
    ivf = _ivf(faiss_index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def build_ondisk(trained, shards: Iterable[Iterable[np.ndarray]], folder: Path):
    """Fill the empty trained IVF index `trained` with every shard's vectors, its lists in `folder`/index.ivfdata.

    `shards`: per shard, its (n, dimension) float32 blocks in the order of the index's rows; row numbers run on
    across shards. Each shard goes into a copy of `trained` (one shard's codes in memory), written as a block index
    under `folder`/.blocks, then `merge_ondisk` writes all lists into index.ivfdata. Returns `trained`, now holding
    the merged lists (memory-mapped).
    """
    faiss = import_faiss()
    from faiss.contrib.ondisk import merge_ondisk

    if trained.ntotal or not trained.is_trained:
        raise ValueError(f"build_ondisk needs an empty, trained IVF index; got ntotal={trained.ntotal}.")
    blocks_dir = Path(folder) / BLOCKS_DIR
    blocks_dir.mkdir(parents=True)
    block_files, row = [], 0
    for number, vectors in enumerate(tqdm(shards, desc="shard blocks", unit="shard")):
        block = faiss.clone_index(trained)
        for array in vectors:
            array = np.ascontiguousarray(array, dtype=np.float32)
            # Rows numbered across shards: the merged lists keep these ids as they are (shift_ids=False).
            block.add_with_ids(array, np.arange(row, row + len(array), dtype=np.int64))
            row += len(array)
        block_file = blocks_dir / f"{number:06d}.faiss"
        faiss.write_index(block, str(block_file))
        block_files.append(str(block_file))
        del block
    if not row:
        raise ValueError("No vectors to index: every shard is empty.")
    logger.info("Merging %d block index(es), %d vectors, into %s", len(block_files), row, folder / IVFDATA_FILE)
    # merge_ondisk maps the blocks and disowns their lists, so the mappings last until the process ends; the block
    # files are unlinked here and their disk space returns then.
    merge_ondisk(trained, block_files, str(Path(folder) / IVFDATA_FILE))
    shutil.rmtree(blocks_dir)
    if trained.ntotal != row:
        raise RuntimeError(f"merge_ondisk gathered {trained.ntotal} vectors from blocks holding {row}.")
    return trained


def write_faiss_index(faiss_index, folder: Path) -> str:
    """Write `faiss_index` as `folder`/index.faiss; returns the name of its lists file in `folder` ('' if none).

    On-disk lists are recorded under their bare file name (so that the folder can be renamed or moved) and copied
    into `folder` first unless they are already there.
    """
    faiss = import_faiss()
    lists = ondisk_lists(faiss_index)
    if lists is None:
        faiss.write_index(faiss_index, str(folder / INDEX_FILE))
        return ""
    source, target = Path(lists.filename), folder / IVFDATA_FILE
    if not target.exists() or not target.samefile(source):
        shutil.copyfile(source, target)
    where = lists.filename
    lists.filename = IVFDATA_FILE
    try:
        faiss.write_index(faiss_index, str(folder / INDEX_FILE))
    finally:
        lists.filename = where
    return IVFDATA_FILE


def read_faiss_index(folder: Path, ivfdata: str = ""):
    """Read `folder`/index.faiss; with `ivfdata` (the lists file's name), map `folder`/ivfdata read-only.

    faiss raises RuntimeError for a bad index.faiss; a lists file that is missing raises FileNotFoundError, one
    shorter than its lists ValueError (mapped, it would crash the process at the first search touching the missing
    pages).
    """
    faiss = import_faiss()
    if not ivfdata:
        return faiss.read_index(str(folder / INDEX_FILE))
    if Path(ivfdata).name != ivfdata:
        raise ValueError(f"the lists file must be a file name inside the index folder, not {ivfdata!r}")
    data = folder / ivfdata
    # The lists' sizes and offsets come from index.faiss; their data is mapped below, not read.
    faiss_index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = ondisk_lists(faiss_index)
    if lists is None:
        raise ValueError(f"{INDEX_FILE} has no on-disk inverted lists, but the metadata names {ivfdata}")
    if not data.is_file():
        raise FileNotFoundError(f"no file {ivfdata}")
    if data.stat().st_size < lists.totsize:
        raise ValueError(f"{data.stat().st_size} bytes where its lists need {lists.totsize}")
    lists.filename = str(data.resolve())
    lists.do_mmap()
    return faiss_index
