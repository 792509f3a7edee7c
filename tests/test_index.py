"""FAISS indexes over a tiny random suffix-prompt encoder: exact search, persistence, shards, resume, bad input."""

import argparse
import csv
import json
import logging
import os

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding

from spt_embed import SuffixPromptEncoder
from spt_embed.cli.index_commands import add_index_parsers
from spt_embed.retrieval.corpus import CorpusSpec, Shard, iter_documents, read_document_at
from spt_embed.retrieval.index import build_index, load_index, model_fingerprint, normalize
from spt_embed.retrieval.indexing import ShardMetadata, index_corpus, list_parts, merge_shards

from .conftest import WORDS, build_tokenizer, make_backbone

PLAIN_WORDS = [w for w in WORDS if w.isalpha()]
TEXTS = [" ".join(np.random.default_rng(i).choice(PLAIN_WORDS, 3 + i % 5)) for i in range(23)]
IDS = [f"doc-{i}é" for i in range(len(TEXTS))]  # non-ASCII string ids must survive save/load
QUERIES = ["a man plays the flute", "the red cat sleeps", "dog runs in the park"]


@pytest.fixture(scope="module")
def model(backbones):
    return SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")


@pytest.fixture(scope="module")
def other_model(backbones):
    return SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, init="random", seed=1, device="cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"_id": i, "title": "", "text": t} for i, t in zip(IDS, TEXTS)])


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_index_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


def results(index, queries=QUERIES, k=5):
    return [[(hit.id, round(hit.score, 5)) for hit in hits] for hits in index.search(queries, k)]


# ----- search ------------------------------------------------------------------------------------------------


def test_flat_search_returns_exact_neighbours(model):
    index = build_index(model, TEXTS, IDS)
    docs = normalize(model.encode_document(TEXTS))
    queries = normalize(model.encode_query(QUERIES))
    scores = queries @ docs.T
    for row, hits in zip(scores, index.search(QUERIES, k=5)):
        expected = np.argsort(-row)[:5]
        assert [hit.id for hit in hits] == [IDS[i] for i in expected]
        assert np.allclose([hit.score for hit in hits], row[expected], atol=1e-5)


def test_query_prompt_applies_to_queries_only(model):
    index = build_index(model, TEXTS, IDS, query_prompt="hello world ")
    assert np.allclose(index.encode_queries(["cat"]), normalize(model.encode_query(["hello world cat"])), atol=1e-5)
    assert index.metadata.query_prompt == "hello world "


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq", "IVF2,Flat"])
def test_approximate_index_types_find_the_document_itself(model, index_type):
    index = build_index(model, TEXTS, IDS, index_type=index_type)
    hits = index.search(model.encode_document(TEXTS[:5]), k=3)
    assert [h[0].id for h in hits] == IDS[:5] or index_type == "ivfpq"  # PQ on 23 vectors is coarse
    assert all(len(h) == 3 for h in hits)


def test_k_is_clamped_and_validated(model, caplog):
    index = build_index(model, TEXTS[:4], IDS[:4])
    with caplog.at_level(logging.WARNING):
        hits = index.search(QUERIES[:1], k=10)
    assert len(hits[0]) == 4 and "larger than the index" in caplog.text
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(QUERIES, k=0)
    with pytest.raises(ValueError, match="Query 1 is empty"):
        index.search(["cat", "  "], k=2)


# ----- persistence and model checks ------------------------------------------------------------------------


def test_ids_and_results_survive_save_and_load(model, tmp_path):
    index = build_index(model, TEXTS, IDS, index_type="hnsw", query_prompt="hello ")
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", model=model)
    assert loaded.ids == IDS and loaded.metadata.factory == "HNSW32" and loaded.metadata.query_prompt == "hello "
    assert results(loaded) == results(index)
    with pytest.raises(FileExistsError, match="overwrite"):
        index.save(tmp_path / "idx")


def test_crash_during_save_keeps_previous_index(model, tmp_path, monkeypatch):
    import faiss

    old = build_index(model, TEXTS[:5], IDS[:5])
    old.save(tmp_path / "idx")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError, match="disk full"):
        build_index(model, TEXTS, IDS).save(tmp_path / "idx", overwrite=True)
    monkeypatch.undo()
    assert load_index(tmp_path / "idx", model=model).ids == IDS[:5]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary folder left behind
    build_index(model, TEXTS, IDS).save(tmp_path / "idx", overwrite=True)
    assert load_index(tmp_path / "idx").ids == IDS


def test_index_of_another_model_is_refused(model, other_model, backbones, tmp_path):
    build_index(model, TEXTS, IDS).save(tmp_path / "idx")
    with pytest.raises(ValueError, match="fingerprint"):
        load_index(tmp_path / "idx", model=other_model)
    wide = SuffixPromptEncoder.from_backbone(make_backbone(tmp_path / "wide", hidden=48), num_tokens=4, device="cpu")
    with pytest.raises(ValueError, match="48 dimensions but the index holds 32"):
        load_index(tmp_path / "idx", model=wide)
    with pytest.raises(ValueError, match="records no model spec"):
        load_index(tmp_path / "idx").search(QUERIES)


def test_plain_sentence_transformer_is_fingerprinted_by_its_weights(tmp_path):
    def static(seed):
        rng = np.random.default_rng(seed)
        tokenizer = build_tokenizer("llama")
        return SentenceTransformer(modules=[StaticEmbedding(tokenizer, rng.normal(size=(len(tokenizer), 16)))])

    first, again, other = static(0), static(0), static(1)
    assert model_fingerprint(first) == model_fingerprint(again) and model_fingerprint(first)[1] == ""
    assert model_fingerprint(first) != model_fingerprint(other)
    index = build_index(first, TEXTS, IDS)
    index.model = again
    with pytest.raises(ValueError, match="fingerprint"):
        index.model = other


# ----- corpus files, shards, resume ------------------------------------------------------------------------


def test_index_corpus_and_cli_search_with_snippets(model, corpus, tmp_path, capsys):
    spt_dir = tmp_path / "adapter"
    model.save(str(spt_dir))
    run_cli(["index", "--model", spt_dir, "--corpus", corpus, "--output", tmp_path / "idx", "--block-size", "5"])
    assert not (tmp_path / "idx.parts").exists()
    index = load_index(tmp_path / "idx")  # reopens the model from the recorded spec
    assert index.ids == IDS and results(index) == results(build_index(model, TEXTS, IDS))
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{QUERIES[0]}\n\n  \n{QUERIES[1]}\n", encoding="utf-8")
    capsys.readouterr()
    run_cli(["search", "--index", tmp_path / "idx", "--queries", queries, "--top-k", "2", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["query_id"], row["query"]) for row in lines] == [("1", QUERIES[0]), ("4", QUERIES[1])]
    top = lines[0]["hits"][0]
    assert top["text"] == TEXTS[IDS.index(top["id"])]
    run_cli(["search", "--index", tmp_path / "idx", "--query", "red cat", "--top-k", "3"])
    assert "query 1: red cat" in capsys.readouterr().out


def test_shards_merged_equal_a_single_index(model, corpus, tmp_path):
    index_corpus(model, corpus, tmp_path / "single", block_size=4)
    for i in range(3):
        index_corpus(model, corpus, tmp_path / f"shard{i}", shard=f"{i}/3", block_size=4)
    assert ShardMetadata.load(tmp_path / "shard1").count == len(range(1, 23, 3))
    merged = merge_shards([tmp_path / f"shard{i}" for i in (2, 0, 1)], tmp_path / "merged")
    single = load_index(tmp_path / "single", model=model)
    merged.model = model
    assert sorted(merged.ids) == sorted(single.ids)
    assert results(merged, k=23) == results(single, k=23)
    assert merged.document_text(IDS[7]) == TEXTS[7]
    with pytest.raises(ValueError, match=r"Missing shard\(s\) 1/3"):
        merge_shards([tmp_path / "shard0", tmp_path / "shard2"], tmp_path / "partial")


@pytest.mark.parametrize("shard", ["0/1", None], ids=["shard-job", "one-machine-index"])
def test_killed_job_resumes_without_reencoding(model, corpus, tmp_path, monkeypatch, shard):
    encoded = []
    real = model.encode_document

    def dies_after_two_batches(texts, **kwargs):
        if len(encoded) == 2:
            raise KeyboardInterrupt("killed")
        encoded.append(len(texts))
        return real(texts, **kwargs)

    output = tmp_path / "out"
    parts = output if shard else tmp_path / "out.parts"  # a one-machine run keeps its blocks next to the output
    monkeypatch.setattr(model, "encode_document", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        index_corpus(model, corpus, output, shard=shard, block_size=3, batch_size=3)
    assert len(list_parts(parts)) == 2 and not ShardMetadata.load(parts).complete
    if shard:
        with pytest.raises(ValueError, match="incomplete"):
            merge_shards([parts], tmp_path / "idx")

    encoded.clear()
    monkeypatch.setattr(model, "encode_document", lambda texts, **kw: encoded.append(len(texts)) or real(texts, **kw))
    index_corpus(model, corpus, output, shard=shard, block_size=3, batch_size=3)
    assert sum(encoded) == len(TEXTS) - 6  # the two finished blocks of 3 were not encoded again
    monkeypatch.undo()
    if shard:
        with pytest.raises(ValueError, match="made with block_size=3, not 4"):
            index_corpus(model, corpus, output, shard=shard, block_size=4)
        index = merge_shards([output], tmp_path / "idx", model=model)
    else:
        assert not parts.exists()
        index = load_index(output, model=model)
    assert results(index) == results(build_index(model, TEXTS, IDS))


def test_shard_and_index_files_are_whole_and_readable_by_others(model, corpus, tmp_path):
    old_umask = os.umask(0o022)
    try:
        index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=10)
        merge_shards([tmp_path / "shard"], tmp_path / "idx")
    finally:
        os.umask(old_umask)
    written = [p for folder in ("shard", "idx") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"shard.json", "000000.npz", "000001.npz", "index_meta.json", "ids.json"}
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}  # not the 0600 of a bare temp file
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_trained_index_from_shards(model, corpus, tmp_path):
    for i in range(2):
        index_corpus(model, corpus, tmp_path / f"shard{i}", shard=f"{i}/2", block_size=5)
    merged = merge_shards([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "ivf", index_type="IVF2,Flat")
    merged.model = model
    assert merged.metadata.factory == "IVF2,Flat"
    assert results(merged) == results(build_index(model, TEXTS, IDS))  # nprobe covers both lists: exact


def test_merge_refuses_shards_of_different_models(model, other_model, corpus, tmp_path):
    index_corpus(model, corpus, tmp_path / "a", shard="0/2")
    index_corpus(other_model, corpus, tmp_path / "b", shard="1/2")
    with pytest.raises(ValueError, match="differ in fingerprint"):
        merge_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "idx")


def test_duplicate_ids(model, tmp_path, caplog):
    with pytest.raises(ValueError, match="'x' appears twice"):
        build_index(model, TEXTS[:3], ["x", "y", "x"])
    rows = [{"id": "a", "text": "cat"}, {"id": "b", "text": "dog"}, {"id": "a", "text": "cat again"}]
    file = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(ValueError, match="'a' appears twice .* lines 1 and 3"):
        index_corpus(model, file, tmp_path / "idx")
    index_corpus(model, file, tmp_path / "idx", on_duplicate="keep-first", overwrite=True)
    assert load_index(tmp_path / "idx").ids == ["a", "b"]
    # The same id in two corpus files, each indexed as its own shard: reported at the merge.
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "b", "text": "red"}, {"id": "c", "text": "blue"}])
    index_corpus(model, file, tmp_path / "s1", shard="0/1", on_duplicate="keep-first")
    index_corpus(model, other, tmp_path / "s2", shard="0/1")
    with pytest.raises(ValueError, match=r"1 document id\(s\) appear in more than one shard: 'b' in .*s1 and .*s2"):
        merge_shards([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    merged = merge_shards([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged", on_duplicate="keep-first")
    assert merged.ids == ["a", "b", "c"] and merged.metadata.corpus is None


# ----- corpus readers and bad input ------------------------------------------------------------------------


def _table(path, rows):
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


@pytest.mark.parametrize(
    "name, content, options, expected",
    [
        ("c.jsonl", '{"_id": "a", "title": "T", "text": "x y"}\n\n{"id": 7, "text": " z "}\n', {},
         [("a", "T x y"), ("7", "z")]),
        ("c.txt", "first doc\n\n second \n", {}, [("1", "first doc"), ("3", "second")]),
        ("c.csv", [["id", "title", "text"], ["a", "", "line one\nline two"], ["b", "B", "c, d"]], {},
         [("a", "line one\nline two"), ("b", "B c, d")]),
        ("c.tsv", [["doc", "body"], ["a", 'say "hi'], ["b", "x"]], {"id_field": "doc", "text_field": "body"},
         [("a", 'say "hi'), ("b", "x")]),
    ],
)
def test_corpus_readers(tmp_path, name, content, options, expected):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif name.endswith(".tsv"):  # written raw: TSV has no quoting
        path.write_text("".join("\t".join(row) + "\n" for row in content), encoding="utf-8")
    else:
        _table(path, content)
    spec = CorpusSpec(path, **options)
    documents = list(iter_documents(spec))
    assert [(d.id, d.text) for d in documents] == expected
    assert [read_document_at(spec, d.offset).text for d in documents] == [text for _, text in expected]
    assert [d.id for d in iter_documents(spec, Shard(1, 2))] == [expected[1][0]]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', r"bad\.jsonl:2: not valid JSON"),
        (b'{"_id": "a", "text": "x"}\n\n{"text": "no id"}\n', r"bad\.jsonl:3: no id field"),
        (b'{"_id": "a", "body": "x"}\n', r"bad\.jsonl:1: no 'text' field"),
        (b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "\xff"}\n', r"bad\.jsonl:2: not UTF-8"),
        (b'[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_lines_are_reported_with_line_numbers(model, tmp_path, content, message, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        index_corpus(model, path, tmp_path / "idx")
    good = content.count(b'"text": "x"')
    with caplog.at_level(logging.WARNING):
        documents = list(iter_documents(CorpusSpec(path, skip_bad_lines=True)))
    assert len(documents) == good and "skipped" in caplog.text


def test_csv_row_with_wrong_column_count(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,text\na,x\nb,y,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.csv:3: 3 columns, the header has 2"):
        list(iter_documents(CorpusSpec(path)))
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(CorpusSpec(path, text_field="body")))


def test_empty_corpus(model, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no documents"):
        index_corpus(model, path, tmp_path / "idx")
    with pytest.raises(ValueError, match="empty corpus"):
        build_index(model, [], [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_corpus(model, tmp_path / "missing.jsonl", tmp_path / "idx")


def test_shard_spec_validation():
    assert Shard.parse("2/4") == Shard(2, 4) and 6 in Shard(2, 4) and 5 not in Shard(2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match="i/N"):
            Shard.parse(bad)

