"""Compressed document vectors (int8, binary): storage, rescoring, persistence, refused combinations, CLI flags."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from sentence_transformers.util import quantize_embeddings

from spt_embed import SuffixPromptEncoder
from spt_embed.cli.index_commands import add_index_parsers
from spt_embed.cli.main import main
from spt_embed.retrieval import precision as precision_module
from spt_embed.retrieval.index import build_index, index_from_embeddings, load_index, normalize
from spt_embed.retrieval.indexing import index_corpus, merge_shards
from spt_embed.retrieval.metadata import META_FILE, IndexMetadata, read_metadata
from spt_embed.retrieval.precision import RANGES_FILE, RESCORE_FILE, bucket_centres

from .conftest import WORDS

PLAIN_WORDS = [w for w in WORDS if w.isalpha()]
TEXTS = [" ".join(np.random.default_rng(i).choice(PLAIN_WORDS, 3 + i % 5)) for i in range(20)]
IDS = [f"d{i}" for i in range(len(TEXTS))]


def unit_vectors(n: int, dimension: int, seed: int = 0) -> np.ndarray:
    return normalize(np.random.default_rng(seed).normal(size=(n, dimension)))


def vector_index(vectors, precision="float32", index_type="flat", **options):
    ids = [f"v{i}" for i in range(len(vectors))]
    metadata = IndexMetadata(fingerprint="f", dimension=vectors.shape[1], index_type=index_type, precision=precision)
    return index_from_embeddings(vectors, ids, metadata, **options)


def hits(index, queries, k=5, **options):
    return [[(hit.id, round(hit.score, 5)) for hit in row] for row in index.search(queries, k, **options)]


@pytest.fixture(scope="module")
def model(backbones):
    return SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_index_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(IDS, TEXTS)), encoding="utf-8")
    return path


# ----- what is stored ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, index_type, dimension, expected",
    [
        ("float32", "flat", 32, 128),
        ("int8", "flat", 32, 32),
        ("binary", "flat", 32, 4),
        ("float32", "hnsw", 32, 128),
        ("int8", "hnsw", 32, 32),
        ("binary", "hnsw", 32, 4),
        ("int8", "flat", 12, 12),
        ("binary", "flat", 12, 2),  # 12 bits padded to 2 bytes
        ("binary-int8", "flat", 32, 4),  # in memory; the int8 copy is on disk (rescore_bytes_per_vector)
        ("binary-int8", "hnsw", 32, 4),
        ("float32", "IVF1,PQ4x4", 32, 2),  # four 4-bit codes
    ],
)
def test_bytes_per_vector(tmp_path, precision, index_type, dimension, expected):
    index = vector_index(unit_vectors(40, dimension), precision, index_type)
    assert index.bytes_per_vector == expected
    index.save(tmp_path / "idx")
    assert read_metadata(tmp_path / "idx").bytes_per_vector == expected
    assert load_index(tmp_path / "idx").bytes_per_vector == expected
    rescore = dimension if precision == "binary-int8" else None
    assert index.rescore_bytes_per_vector == rescore
    assert load_index(tmp_path / "idx").rescore_bytes_per_vector == rescore


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
@pytest.mark.parametrize("precision", ["int8", "binary", "binary-int8"])
def test_stored_codes_are_quantize_embeddings_codes(precision, index_type):
    index = vector_index(unit_vectors(150, 16), precision, index_type)
    vectors = normalize(unit_vectors(150, 16))  # what the index quantises: its input normalised (again)
    searched = index.faiss_index.binary if precision == "binary-int8" else index.faiss_index
    stored = np.stack([searched.reconstruct(i) for i in range(len(vectors))])
    if precision == "int8":
        # All 150 documents calibrate (fewer than CALIBRATION_SAMPLE): the ranges are their min and max.
        assert np.array_equal(index.ranges, np.vstack([vectors.min(axis=0), vectors.max(axis=0)]))
        codes = quantize_embeddings(vectors, precision="uint8", ranges=index.ranges)
        assert np.allclose(stored, bucket_centres(codes, index.ranges), atol=1e-6)
    else:
        assert np.array_equal(stored, quantize_embeddings(vectors, precision="ubinary"))
    if precision == "binary-int8":  # the rescoring copy: the int8 index's codes, calibrated the same way
        assert np.array_equal(index.ranges, np.vstack([vectors.min(axis=0), vectors.max(axis=0)]))
        codes = quantize_embeddings(vectors, precision="uint8", ranges=index.ranges)
        rescoring = index.faiss_index.int8.reconstruct_n(0, len(vectors))
        assert np.allclose(rescoring, bucket_centres(codes, index.ranges), atol=1e-6)


@pytest.mark.parametrize("seed, same", [(0, True), (1, False)])
def test_int8_calibration_is_a_seeded_sample(monkeypatch, seed, same):
    monkeypatch.setattr(precision_module, "CALIBRATION_SAMPLE", 30)
    vectors = unit_vectors(200, 8)
    first, again = vector_index(vectors, "int8"), vector_index(vectors, "int8", seed=seed)
    assert first.metadata.calibration["sample"] == 30 and again.metadata.calibration["seed"] == seed
    assert np.array_equal(first.ranges, again.ranges) == same


# ----- search and rescoring ------------------------------------------------------------------------------------

# Query: every sign positive, dimension 0 dominant. "near" agrees in sign with the query but on the weak dimensions
# only (Hamming 1, at dimension 0); "best" disagrees on two weak dimensions (Hamming 2) but is the float32 top-1.
TOY_QUERY = [[1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]
TOY_DOCS = {
    "near": [-1, 1, 1, 1, 1, 1, 1, 1],
    "best": [1, -0.1, -0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    "far": [-1, -1, -1, -1, 1, 1, 1, 1],
    "opposite": [-1, -1, -1, -1, -1, -1, -1, -1],
}


def toy_index(precision, index_type):
    metadata = IndexMetadata(fingerprint="f", dimension=8, index_type=index_type, precision=precision)
    return index_from_embeddings(np.array(list(TOY_DOCS.values())), list(TOY_DOCS), metadata)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
@pytest.mark.parametrize(
    "precision, rescore_multiplier, top",
    [
        ("float32", None, "best"),
        ("binary", 0, "near"),  # Hamming distance alone misorders
        ("binary", 1, "near"),  # rescoring the one candidate fetched cannot find "best"
        ("binary", 4, "best"),  # over-fetched and rescored with the float query: the float32 top-1
        ("int8", 4, "best"),
        ("binary-int8", 0, "near"),  # the first pass is the binary index's
        ("binary-int8", 4, "best"),
    ],
)
def test_rescoring_restores_the_float32_top_hit(index_type, precision, rescore_multiplier, top):
    index = toy_index(precision, index_type)
    assert index.search(np.array(TOY_QUERY), k=1, rescore_multiplier=rescore_multiplier)[0][0].id == top


def test_binary_scores_are_cosines_with_sign_vectors():
    query = normalize(np.array(TOY_QUERY))
    index = toy_index("binary", "flat")
    signs = np.sign(np.array(TOY_DOCS["best"]))
    assert np.isclose(index.search(query, 1, rescore_multiplier=4)[0][0].score, query[0] @ signs / np.sqrt(8))
    near = index.search(query, 1, rescore_multiplier=0)[0][0]
    assert near.id == "near" and np.isclose(near.score, 1 - 2 * 1 / 8)  # one of eight signs differs


def test_index_default_multiplier_is_used(tmp_path):
    metadata = IndexMetadata(fingerprint="f", dimension=8, precision="binary", rescore_multiplier=0)
    index = index_from_embeddings(np.array(list(TOY_DOCS.values())), list(TOY_DOCS), metadata)
    assert index.search(np.array(TOY_QUERY), 1)[0][0].id == "near"
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert loaded.metadata.rescore_multiplier == 0 and loaded.search(np.array(TOY_QUERY), 1)[0][0].id == "near"
    assert loaded.search(np.array(TOY_QUERY), 1, rescore_multiplier=4)[0][0].id == "best"
    with pytest.raises(ValueError, match="rescore_multiplier must be a non-negative integer"):
        loaded.search(np.array(TOY_QUERY), 1, rescore_multiplier=-1)


def test_binary_int8_rescores_as_the_int8_index_scores():
    # Over-fetching every document, binary-int8 ranks and scores all of them with its int8 copy: the int8 index's
    # exact search (same calibration), while plain binary rescores with sign vectors.
    vectors, queries = unit_vectors(60, 16), unit_vectors(5, 16, seed=3)
    int8 = hits(vector_index(vectors, "int8"), queries, k=10)
    assert hits(vector_index(vectors, "binary-int8"), queries, k=10, rescore_multiplier=6) == int8
    assert hits(vector_index(vectors, "binary"), queries, k=10, rescore_multiplier=6) != int8


@pytest.mark.parametrize("precision", ["int8", "binary", "binary-int8"])
def test_k_larger_than_the_index_returns_every_document_once(precision):
    index = vector_index(unit_vectors(6, 16), precision)
    rows = index.search(unit_vectors(3, 16, seed=1), k=10)
    assert all(sorted(hit.id for hit in row) == sorted(index.ids) for row in rows)


# ----- persistence ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
@pytest.mark.parametrize("precision", ["int8", "binary", "binary-int8"])
def test_compressed_index_survives_save_and_load(tmp_path, precision, index_type):
    index = vector_index(unit_vectors(120, 24), precision, index_type)
    queries = unit_vectors(4, 24, seed=7)
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert loaded.metadata.precision == precision and loaded.metadata.factory == index.metadata.factory
    assert hits(loaded, queries) == hits(index, queries)
    assert hits(loaded, queries, rescore_multiplier=0) == hits(index, queries, rescore_multiplier=0)
    assert (tmp_path / "idx" / RANGES_FILE).is_file() == (precision != "binary")
    assert (tmp_path / "idx" / RESCORE_FILE).is_file() == (precision == "binary-int8")
    if precision != "binary":
        assert np.array_equal(loaded.ranges, index.ranges)
        assert loaded.metadata.calibration == index.metadata.calibration
        assert loaded.metadata.calibration["file"] == RANGES_FILE


def test_binary_int8_index_without_its_rescoring_vectors_is_refused(tmp_path):
    vector_index(unit_vectors(30, 16), "binary-int8").save(tmp_path / "idx")
    (tmp_path / "idx" / RESCORE_FILE).unlink()
    with pytest.raises(ValueError, match=r"index\.faiss is missing, truncated or damaged \(the int8 rescoring vectors "
                       r"rescore_int8\.faiss are missing\)\. Rebuild the index"):
        load_index(tmp_path / "idx")


def test_index_folder_without_precision_loads_as_float32(tmp_path):
    vectors = unit_vectors(30, 16)
    vector_index(vectors).save(tmp_path / "idx")
    meta_file = tmp_path / "idx" / META_FILE
    data = json.loads(meta_file.read_text(encoding="utf-8"))
    for name in ("precision", "rescore_multiplier", "calibration", "bytes_per_vector", "backend"):
        del data[name]
    meta_file.write_text(json.dumps(data), encoding="utf-8")
    loaded = load_index(tmp_path / "idx")
    assert loaded.metadata.precision == "float32" and loaded.bytes_per_vector == 64
    assert loaded.metadata.backend == "torch"
    assert hits(loaded, vectors[:3], k=1) == [[(f"v{i}", 1.0)] for i in range(3)]


# ----- refused input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, index_type",
    [("binary", "ivfpq"), ("binary", "IVF4,PQ8"), ("binary", "IVF2,Flat"), ("int8", "ivfpq"), ("int8", "PQ8"),
     ("binary-int8", "ivfpq")],
)
def test_precision_the_index_type_cannot_hold_is_refused_before_encoding(tmp_path, precision, index_type):
    message = rf"precision '{precision}' cannot be used with index type '{index_type}'.*--index-type flat or hnsw"
    # No model and no corpus file: the check comes before either is touched.
    with pytest.raises(ValueError, match=message):
        build_index(None, ["a text"], precision=precision, index_type=index_type)
    with pytest.raises(ValueError, match=message):
        index_corpus("no-such-model", tmp_path / "missing.jsonl", tmp_path / "idx", precision=precision,
                     index_type=index_type)
    with pytest.raises(ValueError, match=message):
        vector_index(unit_vectors(300, 16), precision, index_type)


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: build_index(None, ["a"], precision="fp16"),
        lambda tmp: index_corpus("no-such-model", tmp / "c.jsonl", tmp / "idx", precision="fp16"),
        lambda tmp: IndexMetadata(fingerprint="f", dimension=4, precision="fp16"),
    ],
    ids=["build_index", "index_corpus", "metadata"],
)
def test_unknown_precision_lists_the_allowed_ones(tmp_path, call):
    allowed = r"precision='fp16' is not supported; choose one of 'float32', 'int8', 'binary', 'binary-int8'"
    with pytest.raises(ValueError, match=allowed):
        call(tmp_path)


def test_merge_refuses_a_precision_its_index_type_cannot_hold(model, corpus, tmp_path):
    index_corpus(model, corpus, tmp_path / "shard", shard="0/1", index_type="ivfpq")
    with pytest.raises(ValueError, match="precision 'int8' cannot be used with index type 'ivfpq'"):
        merge_shards([tmp_path / "shard"], tmp_path / "idx", precision="int8")
    assert not (tmp_path / "idx").exists()


# ----- encoder, corpus files and command line ------------------------------------------------------------------


def test_cli_flags_reach_the_index(model, corpus, tmp_path, capsys):
    spt_dir = tmp_path / "adapter"
    model.save(str(spt_dir))
    run_cli(["index", "--model", spt_dir, "--corpus", corpus, "--output", tmp_path / "idx", "--precision", "int8",
             "--index-type", "hnsw", "--rescore-multiplier", "3"])
    assert "HNSW32,SQ8, dimension 32, int8, 32 bytes per vector, rescoring 3x candidates" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "idx")
    assert (meta.precision, meta.rescore_multiplier, meta.factory) == ("int8", 3, "HNSW32,SQ8")
    assert meta.calibration["sample"] == len(TEXTS) and (tmp_path / "idx" / RANGES_FILE).is_file()
    run_cli(["search", "--index", tmp_path / "idx", "--query", "red cat", "--top-k", "3", "--rescore-multiplier", "0"])
    out = capsys.readouterr().out
    assert "int8, 32 bytes per vector, no rescoring" in out and "query 1: red cat" in out


def test_cli_shards_carry_the_precision_to_the_merge(model, corpus, tmp_path, capsys):
    spt_dir = tmp_path / "adapter"
    model.save(str(spt_dir))
    for i in range(2):
        run_cli(["index", "--model", spt_dir, "--corpus", corpus, "--output", tmp_path / f"s{i}", "--shard", f"{i}/2",
                 "--precision", "binary"])
    shards = [tmp_path / "s0", tmp_path / "s1"]
    run_cli(["index-merge", *shards, "--output", tmp_path / "binary"])
    assert "BFlat, binary, 4 bytes per vector, rescoring 4x candidates" in capsys.readouterr().out
    run_cli(["index-merge", *shards, "--output", tmp_path / "int8", "--precision", "int8",
             "--rescore-multiplier", "2"])
    meta = read_metadata(tmp_path / "int8")
    assert (meta.precision, meta.rescore_multiplier, meta.bytes_per_vector) == ("int8", 2, 32)
    run_cli(["index-merge", *shards, "--output", tmp_path / "binary-int8", "--precision", "binary-int8"])
    assert "BFlat + SQ8 rescoring, binary-int8, 4 bytes per vector in memory (+ an int8 copy on disk), rescoring 4x" \
        in capsys.readouterr().out
    assert (tmp_path / "binary-int8" / RESCORE_FILE).is_file()
    # The refused combination through the command line: exit status 2 and the message, nothing encoded.
    code = main(["index", "--model", str(spt_dir), "--corpus", str(corpus), "--output", str(tmp_path / "no"),
                 "--precision", "binary", "--index-type", "ivfpq"])
    assert code == 2 and "precision 'binary' cannot be used with index type 'ivfpq'" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not (tmp_path / "no.parts").exists()


@pytest.mark.parametrize("precision", ["int8", "binary", "binary-int8"])
def test_build_index_with_an_encoder(model, precision):
    index = build_index(model, TEXTS, IDS, precision=precision, rescore_multiplier=5)
    assert index.metadata.precision == precision and index.metadata.rescore_multiplier == 5
    top = [row[0].id for row in index.search(model.encode_document(TEXTS[:4]), k=1)]
    assert top == IDS[:4]  # each document finds itself
