"""IVF indexes merged on disk (faiss.contrib.ondisk): same neighbours as an IVF built in one go, memory-mapped
lists, folders that move, and bad input refused before anything is written. Random unit vectors in shard folders
written here in the documented format (spt_embed.retrieval.shards), so no encoder is needed."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest

from spt_embed.cli.index_commands import add_index_parsers
from spt_embed.retrieval.corpus import CorpusSpec
from spt_embed.retrieval.faiss_factory import import_faiss
from spt_embed.retrieval.index import load_index
from spt_embed.retrieval.indexing import merge_shards
from spt_embed.retrieval.metadata import INDEX_FILE, IVFDATA_FILE, PARTS_DIR, ShardMetadata, read_metadata
from spt_embed.retrieval.ondisk import ondisk_lists

DIMENSION, COUNT, SHARDS, K = 32, 1200, 3, 10


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


VECTORS = unit(np.random.default_rng(0).normal(size=(COUNT, DIMENSION)))
IDS = [f"doc{i}" for i in range(COUNT)]
# Queries near documents (each a perturbed document vector), so that neighbours are meaningful.
QUERIES = unit(VECTORS[:40] + 0.3 * np.random.default_rng(1).normal(size=(40, DIMENSION)) / np.sqrt(DIMENSION))


def write_shard(folder, vectors, ids, *, shard="0/1", fingerprint="random", index_type="ivfpq", dimension=None,
                block_size=150):
    """A complete shard folder: shard.json and parts/NNNNNN.npz as `spt-embed index --shard` writes them."""
    (folder / PARTS_DIR).mkdir(parents=True)
    parts = 0
    for parts, start in enumerate(range(0, len(ids), block_size), start=1):
        rows = slice(start, start + block_size)
        np.savez(
            folder / PARTS_DIR / f"{parts - 1:06d}.npz",
            embeddings=vectors[rows],
            ids=np.array(ids[rows], dtype=np.str_),
            records=np.arange(start, start + len(ids[rows]), dtype=np.int64),
            offsets=np.arange(start, start + len(ids[rows]), dtype=np.int64) * 10,
            digest=np.array(""),
        )
    meta = ShardMetadata(
        fingerprint=fingerprint,
        dimension=dimension or vectors.shape[1],
        corpus=CorpusSpec("corpus.jsonl").to_dict(),
        shard=shard,
        index_type=index_type,
        block_size=block_size,
        complete=True,
        count=len(ids),
        parts=parts,
    )
    meta.save(folder)
    return folder


def write_shards(root, count=SHARDS, **options):
    """Shard i holds the records r with r % count == i, as a sharded `spt-embed index` run splits a corpus."""
    return [
        write_shard(root / f"shard{i}", VECTORS[i::count], IDS[i::count], shard=f"{i}/{count}", **options)
        for i in range(count)
    ]


def hits(index, k=K):
    return [[(hit.id, hit.score) for hit in row] for row in index.search(QUERIES, k)]


def same_hits(found, expected):
    for got, want in zip(found, expected):
        assert [doc_id for doc_id, _ in got] == [doc_id for doc_id, _ in want]
        assert np.allclose([score for _, score in got], [score for _, score in want], atol=1e-5)


def set_nprobe_to_all_lists(faiss_index):
    ivf = import_faiss().extract_index_ivf(faiss_index)
    ivf.nprobe = ivf.nlist


def one_go_twin(folder, ids):
    """An in-memory IVF with the quantiser (and PQ/SQ) of the merged index at `folder`, every vector added at once
    in the merged index's row order."""
    faiss = import_faiss()
    twin = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_SKIP_IVF_DATA)  # the trained part only
    ivf = faiss.extract_index_ivf(twin)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    twin.ntotal = ivf.ntotal = 0
    twin.add(VECTORS[[IDS.index(doc_id) for doc_id in ids]])
    set_nprobe_to_all_lists(twin)
    return twin


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_index_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


# ----- the merge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", ["IVF8,Flat", "IVF8,PQ8x4", "IVF8,SQ8", "ivfpq", "PCA16,IVF8,Flat"])
def test_ondisk_merge_equals_an_ivf_built_in_one_go(tmp_path, index_type):
    shards = write_shards(tmp_path)
    merged = merge_shards(shards, tmp_path / "idx", index_type=index_type)
    assert merged.metadata.ivfdata == IVFDATA_FILE and (tmp_path / "idx" / IVFDATA_FILE).is_file()
    assert ondisk_lists(merged.faiss_index) is not None
    assert not list((tmp_path / "idx").glob(".*"))  # the block indexes are gone
    set_nprobe_to_all_lists(merged.faiss_index)
    twin = one_go_twin(tmp_path / "idx", merged.ids)
    scores, rows = twin.search(QUERIES, K)
    same_hits(hits(merged), [[(merged.ids[r], s) for r, s in zip(*row)] for row in zip(rows, scores)])
    if index_type == "IVF8,Flat":  # every list probed, no compression: exact
        exact = QUERIES @ VECTORS.T
        best = np.argsort(-exact, axis=1)[:, :K]
        same_hits(hits(merged), [[(IDS[j], exact[q, j]) for j in row] for q, row in enumerate(best)])


def test_load_maps_the_lists_read_only_instead_of_reading_them(tmp_path):
    merge_shards(write_shards(tmp_path), tmp_path / "idx", index_type="IVF8,Flat")
    index = load_index(tmp_path / "idx")
    lists = ondisk_lists(index.faiss_index)
    assert lists is not None and lists.read_only
    assert lists.filename == str((tmp_path / "idx" / IVFDATA_FILE).resolve())
    data, header = (tmp_path / "idx" / IVFDATA_FILE).stat().st_size, (tmp_path / "idx" / INDEX_FILE).stat().st_size
    assert data >= COUNT * (DIMENSION * 4 + 8) and header < data / 20  # the vectors are in the mapped file only


@pytest.mark.parametrize(
    "index_type, on_disk",
    [("flat", False), ("hnsw", False), ("IVF8,Flat", True), ("ivfpq", True), ("IVF8,PQ8x4fs", False),
     ("IVF8,PQ8x4,RFlat", False)],
)
def test_index_merge_chooses_by_index_type(tmp_path, capsys, index_type, on_disk):
    shards = write_shards(tmp_path)
    run_cli(["index-merge", *shards, "--output", tmp_path / "idx", "--index-type", index_type])
    assert "on disk" in capsys.readouterr().out or not on_disk
    assert read_metadata(tmp_path / "idx").ivfdata == (IVFDATA_FILE if on_disk else "")
    assert (tmp_path / "idx" / IVFDATA_FILE).exists() == on_disk
    index = load_index(tmp_path / "idx")
    found = hits(index)
    assert len(index) == COUNT and all(len(row) == K for row in found)
    if index_type in ("flat", "IVF8,Flat"):  # exact: each query's source document first
        assert [row[0][0] for row in found] == IDS[: len(QUERIES)]


# ----- folders that move --------------------------------------------------------------------------------------


def test_moved_folder_loads_and_searches(tmp_path):
    merged = merge_shards(write_shards(tmp_path), tmp_path / "a" / "idx", index_type="IVF8,PQ8x4")
    expected = hits(merged)
    stored = (tmp_path / "a" / "idx" / INDEX_FILE).read_bytes()
    assert str(tmp_path).encode() not in stored and b".tmp-" not in stored  # only the bare file name is stored
    del merged
    shutil.move(tmp_path / "a" / "idx", tmp_path / "b")
    moved = load_index(tmp_path / "b")
    assert ondisk_lists(moved.faiss_index).filename == str((tmp_path / "b" / IVFDATA_FILE).resolve())
    same_hits(hits(moved), expected)
    # Saving a loaded on-disk index elsewhere copies its lists into the new folder.
    moved.save(tmp_path / "copy")
    del moved
    shutil.rmtree(tmp_path / "b")
    same_hits(hits(load_index(tmp_path / "copy")), expected)


def test_overwrite_replaces_an_ondisk_index_atomically(tmp_path, monkeypatch):
    import faiss.contrib.ondisk

    shards = write_shards(tmp_path)
    expected = hits(merge_shards(shards, tmp_path / "idx", index_type="IVF8,Flat"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss.contrib.ondisk, "merge_ondisk", crash)
    with pytest.raises(OSError, match="disk full"):
        merge_shards(shards, tmp_path / "idx", index_type="IVF8,PQ8x4", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "shard0", "shard1", "shard2"]  # no staging left
    same_hits(hits(load_index(tmp_path / "idx")), expected)
    replaced = merge_shards(shards, tmp_path / "idx", index_type="IVF8,PQ8x4", overwrite=True)
    assert replaced.metadata.factory == "IVF8,PQ8x4" and len(load_index(tmp_path / "idx")) == COUNT


# ----- damaged folders and bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_short_lists_file_is_a_clear_error(tmp_path, damage):
    merge_shards(write_shards(tmp_path), tmp_path / "idx", index_type="IVF8,Flat")
    data = tmp_path / "idx" / IVFDATA_FILE
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1000])  # mapped as it is, the first search would crash the process
    with pytest.raises(ValueError, match=r"index\.ivfdata is missing, truncated or damaged .*Rebuild the index"):
        load_index(tmp_path / "idx")


def test_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    shards = write_shards(tmp_path)
    expected = hits(merge_shards(shards, tmp_path / "idx", index_type="IVF8,Flat"))
    before = sorted(p.name for p in (tmp_path / "idx").iterdir())

    def no_work(*args, **kwargs):
        raise AssertionError("the merge started before refusing the output")

    monkeypatch.setattr("spt_embed.retrieval.indexing.new_index", no_work)
    with pytest.raises(FileExistsError, match="idx exists; nothing was written. Pass --overwrite"):
        run_cli(["index-merge", *shards, "--output", tmp_path / "idx", "--index-type", "IVF8,Flat"])
    with pytest.raises(FileExistsError, match="is not an index folder"):
        merge_shards(shards[1:], shards[0], overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == before
    same_hits(hits(load_index(tmp_path / "idx")), expected)
    assert ShardMetadata.load(shards[0]).complete


@pytest.mark.parametrize(
    "second, message",
    [
        ({"fingerprint": "another-model"}, "differ in fingerprint"),
        ({"dimension": 48}, "differ in dimension"),
        ({"index_type": "flat"}, r"made for index types \['flat', 'ivfpq'\]; choose one with --index-type"),
        ({"width": 16}, r"000000\.npz holds embeddings of shape \(150, 16\), but its shard folder records dimension"),
    ],
    ids=["model", "dimension", "index-type", "damaged-part"],
)
def test_shards_that_do_not_belong_together_are_refused(tmp_path, second, message):
    first = write_shard(tmp_path / "s0", VECTORS[0::2], IDS[0::2], shard="0/2")
    width = second.pop("width", DIMENSION)
    vectors = unit(np.random.default_rng(2).normal(size=(COUNT // 2, width))) if width != DIMENSION else VECTORS[1::2]
    other = write_shard(tmp_path / "s1", vectors, IDS[1::2], shard="1/2",
                        **({"dimension": DIMENSION} if width != DIMENSION else {}), **second)
    with pytest.raises(ValueError, match=message):
        merge_shards([first, other], tmp_path / "idx")
    assert not (tmp_path / "idx").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
