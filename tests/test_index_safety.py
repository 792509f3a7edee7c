"""Indexes that never hold stale or meaningless entries: a resumed job notices an edited corpus, empty documents
are left out, a damaged index file is a clear error, and faiss's loader does not fill the log."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from spt_embed import SuffixPromptEncoder
from spt_embed.cli.main import main
from spt_embed.retrieval.index import build_index, load_index
from spt_embed.retrieval.indexing import index_corpus, list_parts
from spt_embed.retrieval.metadata import ShardMetadata, read_metadata
from spt_embed.retrieval.shards import CorpusChangedError

from .conftest import WORDS

PLAIN_WORDS = [w for w in WORDS if w.isalpha()]
TEXTS = [" ".join(np.random.default_rng(i).choice(PLAIN_WORDS, 3 + i % 5)) for i in range(12)]
IDS = [f"d{i}" for i in range(len(TEXTS))]
QUERIES = ["a man plays the flute", "the red cat sleeps"]


@pytest.fixture(scope="module")
def model(backbones):
    return SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")


def write_corpus(path, texts, ids=IDS):
    path.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(ids, texts)), encoding="utf-8")
    return path


def results(index):
    return [[(hit.id, round(hit.score, 5)) for hit in hits] for hits in index.search(QUERIES, 5)]


def _kill_after(monkeypatch, model, batches):
    """model.encode_document raises after `batches` calls: a job killed mid-corpus."""
    real, calls = model.encode_document, []

    def encode(texts, **kwargs):
        if len(calls) == batches:
            raise KeyboardInterrupt("killed")
        calls.append(len(texts))
        return real(texts, **kwargs)

    monkeypatch.setattr(model, "encode_document", encode)


# ----- resume after the corpus changed -------------------------------------------------------------------------


def test_one_machine_index_reencodes_a_corpus_edited_in_place(model, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    _kill_after(monkeypatch, model, 2)
    with pytest.raises(KeyboardInterrupt):
        index_corpus(model, corpus, tmp_path / "idx", block_size=3, batch_size=3)
    monkeypatch.undo()
    assert len(list_parts(tmp_path / "idx.parts")) == 2
    # Same ids, same number of records, same line count: only the texts of the finished blocks differ.
    edited = list(reversed(TEXTS[:6])) + TEXTS[6:]
    write_corpus(corpus, edited)
    index_corpus(model, corpus, tmp_path / "idx", block_size=3, batch_size=3)
    index = load_index(tmp_path / "idx", model=model)
    assert results(index) == results(build_index(model, edited, IDS))


def test_shard_job_refuses_a_corpus_edited_since_its_parts(model, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    _kill_after(monkeypatch, model, 1)
    with pytest.raises(KeyboardInterrupt):
        index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=4, batch_size=4)
    monkeypatch.undo()
    write_corpus(corpus, [TEXTS[1], TEXTS[0]] + TEXTS[2:])  # two texts of the finished block swapped
    with pytest.raises(CorpusChangedError, match=r"000000\.npz \(their ids or texts differ\)"):
        index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=4, batch_size=4)
    # A complete shard is checked too before it is reused.
    index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=4, overwrite=True)
    assert ShardMetadata.load(tmp_path / "shard").complete
    write_corpus(corpus, TEXTS)
    with pytest.raises(CorpusChangedError):
        index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=4)
    index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=4, overwrite=True)
    index_corpus(model, corpus, tmp_path / "shard", shard="0/1", block_size=4)  # unchanged: reused as it is


# ----- empty documents -----------------------------------------------------------------------------------------


def test_empty_documents_are_not_indexed(model, tmp_path, caplog):
    texts = TEXTS[:5] + ["", "   "] + TEXTS[5:]
    ids = [f"d{i}" for i in range(len(texts))]
    corpus = write_corpus(tmp_path / "corpus.jsonl", texts, ids)
    with caplog.at_level("WARNING"):
        index_corpus(model, corpus, tmp_path / "idx", block_size=4)
    assert "skipped 2 document(s) with no text" in caplog.text and "line(s) 6, 7" in caplog.text
    index = load_index(tmp_path / "idx", model=model)
    assert "d5" not in index.ids and "d6" not in index.ids and len(index) == len(TEXTS)
    assert read_metadata(tmp_path / "idx").skipped_empty == 2
    kept = [i for i, t in zip(ids, texts) if t.strip()]
    assert results(index) == results(build_index(model, [t for t in texts if t.strip()], kept))
    # The in-memory builder leaves them out too, and refuses a corpus of nothing but empty texts.
    in_memory = build_index(model, texts, ids)
    assert in_memory.ids == kept and in_memory.metadata.skipped_empty == 2
    with pytest.raises(ValueError, match="all 2 texts are empty"):
        build_index(model, ["", " "])


# ----- damaged or unsupported files ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep_bytes", [0, 40])
def test_truncated_index_file_is_a_clear_error(model, tmp_path, capsys, keep_bytes):
    build_index(model, TEXTS, IDS, model_spec="").save(tmp_path / "idx")
    faiss_file = tmp_path / "idx" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:keep_bytes])
    with pytest.raises(ValueError, match=r"idx/index\.faiss is missing, truncated or damaged .*Rebuild the index"):
        load_index(tmp_path / "idx")
    assert main(["search", "--index", str(tmp_path / "idx"), "--query", "cat"]) == 2
    assert "index.faiss is missing, truncated or damaged" in capsys.readouterr().err


def test_json_corpus_is_refused_not_read_line_by_line(model, tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([{"_id": i, "text": t} for i, t in zip(IDS, TEXTS)], indent=1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus\.json: a \.json file is not read as a corpus.*\.jsonl"):
        index_corpus(model, corpus, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_faiss_loader_lines_stay_out_of_the_log(model, tmp_path):
    build_index(model, TEXTS, IDS).save(tmp_path / "idx")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from spt_embed.retrieval.index import load_index; load_index(sys.argv[1])"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "idx")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "faiss.loader" not in run.stderr and "swigfaiss" not in run.stderr
