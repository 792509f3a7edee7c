"""Parquet corpora (the jsonl rules on a table's rows) and reading a corpus from a document's position, as the
workers of `index --engine ray` read their blocks: records, lines and offsets numbered as from the file's start."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spt_embed.retrieval.corpus import CorpusSpec, iter_documents, read_document_at

ROWS = [{"_id": f"d{i}", "text": " ".join(["word"] * (1 + i % 4)) if i != 6 else ""} for i in range(12)]


@pytest.mark.parametrize("fmt", ["jsonl", "text", "csv", "parquet"])
def test_reading_from_a_position_numbers_as_from_the_start(tmp_path, fmt):
    rows = ROWS
    path = tmp_path / f"c.{'txt' if fmt == 'text' else fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows[:5]) + "\n\n" +
                        "\n".join(json.dumps(row) for row in rows[5:]) + "\n", encoding="utf-8")
    elif fmt == "text":
        path.write_text("\n".join(row["text"] or "  " for row in rows) + "\n\n  last\n", encoding="utf-8")
    elif fmt == "csv":
        path.write_text("id,text\n" + "".join(f'{row["_id"]},"{row["text"]}\nmore"\n' for row in rows),
                        encoding="utf-8")
    else:
        pq.write_table(pa.table({"id": [str(r["_id"]) for r in rows], "text": [r["text"] for r in rows]}), path,
                       row_group_size=5)
    spec = CorpusSpec(str(path))
    documents = list(iter_documents(spec))
    assert len(documents) >= 12
    for start in range(len(documents)):
        assert list(iter_documents(spec, start=documents[start].position)) == documents[start:]


def test_parquet_corpus_follows_the_jsonl_rules(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [7, 8, 9], "title": ["T", None, ""], "text": ["x y", " z ", None],
                             "meta": [1.0, 2.0, 3.0]}), path)
    spec = CorpusSpec(str(path))
    assert [(d.id, d.text, d.record, d.line) for d in iter_documents(spec)] == [
        ("7", "T x y", 0, 1), ("8", "z", 1, 2), ("9", "", 2, 3)
    ]
    with pytest.raises(ValueError, match=r"c\.parquet: no column 'body' among \['id', 'title', 'text', 'meta'\]"):
        list(iter_documents(CorpusSpec(str(path), text_field="body")))
    pq.write_table(pa.table({"id": [1.5], "text": ["x"]}), path)
    with pytest.raises(ValueError, match=r"c\.parquet:1: id 1.5 in 'id' is not a non-empty string"):
        list(iter_documents(spec))


def test_read_document_at_a_parquet_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"_id": [r["_id"] for r in ROWS], "text": [r["text"] for r in ROWS]}), path,
                   row_group_size=5)
    spec = CorpusSpec(str(path))
    assert [read_document_at(spec, row).id for row in (0, 4, 5, 11)] == ["d0", "d4", "d5", "d11"]
    with pytest.raises(ValueError, match="no document at byte offset 12"):
        read_document_at(spec, 12)
    assert CorpusSpec(str(tmp_path / "c.PARQUET")).format.value == "parquet"
