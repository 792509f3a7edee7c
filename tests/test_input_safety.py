"""Inputs read the way they are written: training columns never guessed by position (or taken from a label
column), encode reading .json/.csv/.tsv as records, clear errors for empty or malformed files and a broken GGUF;
no FutureWarning from the fast path; an SPDX licence string."""

from __future__ import annotations

import csv
import json
import re
import struct
import sys
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from spt_embed import ForwardPath, SuffixPromptEncoder
from spt_embed.cli.main import main
from spt_embed.model.backbone import load_backbone
from spt_embed.training.data import load_pairs

from .conftest import SENTENCES

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["entailment", "neutral", "contradiction"]


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def nli_rows(n: int = 30) -> list[list[str]]:
    return [[f"premise sentence {i} about a man", f"hypothesis {i} about a person", LABELS[i % 3]] for i in range(n)]


# ----- training columns ----------------------------------------------------------------------------------------


def test_nli_file_is_not_taken_in_column_order(tmp_path):
    path = write_csv(tmp_path / "nli.csv", ["premise", "hypothesis", "label"], nli_rows())
    with pytest.raises(ValueError) as info:
        load_pairs(path)
    message = str(info.value)
    assert "['premise', 'hypothesis', 'label']" in message
    assert "--anchor-column/--positive-column/--negative-column" in message


@pytest.mark.parametrize(
    "header, rows, kwargs, how",
    [
        # two unnamed columns are taken in order, but a label column is never a text
        (["sentence", "label"], [[r[0], r[2]] for r in nli_rows()], {}, "taken by position for the positive"),
        # also when a flag names it
        (["premise", "hypothesis", "label"], nli_rows(), {"anchor": "premise", "positive": "hypothesis",
                                                          "negative": "label"}, "named for the negative"),
    ],
)
def test_label_column_is_never_text(tmp_path, header, rows, kwargs, how):
    path = write_csv(tmp_path / "data.csv", header, rows)
    with pytest.raises(ValueError) as info:
        load_pairs(path, **kwargs)
    message = str(info.value)
    assert f"column 'label' ({how})" in message and "'contradiction', 'entailment', 'neutral'" in message
    assert str(header) in message and "--anchor-column" in message


def test_two_unnamed_text_columns_are_taken_in_order(tmp_path):
    rows = [[f"question {i} about cats", f"answer {i} about cats"] for i in range(30)]
    loaded = load_pairs(write_csv(tmp_path / "qa.csv", ["question", "answer"], rows))
    assert loaded.column_names == ["anchor", "positive"] and loaded[0] == dict(zip(["anchor", "positive"], rows[0]))
    # Named columns of an NLI file still work, and a file's own text column names are trusted.
    named = load_pairs(write_csv(tmp_path / "nli.csv", ["premise", "hypothesis", "label"], nli_rows()),
                       anchor="premise", positive="hypothesis")
    assert named.column_names == ["anchor", "positive"] and len(named) == 30


# ----- empty and malformed training files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("pairs.jsonl", "", r"pairs\.jsonl is empty"),
        ("pairs.jsonl", "\n\n", r"pairs\.jsonl holds no rows"),
        ("pairs.csv", "anchor,positive\n", r"pairs\.csv holds no rows \(only a header\)"),
        ("pairs.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": \n',
         r"pairs\.jsonl:2: not valid JSON \(Expecting value, column 29\)"),
        ("pairs.jsonl", '{"anchor": "a", "positive": "b"}\n\n[1, 2]\n{"anchor": "c", "positive": "d"}\n',
         r"pairs\.jsonl:3: expected a JSON object"),
        ("pairs.json", '[{"anchor": "a", "positive": "b"},\n {"anchor": "c" "positive": "d"}]',
         r"pairs\.json:2: not valid JSON \(Expecting ',' delimiter, column 17\)"),
    ],
)
def test_empty_or_malformed_training_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_pairs(path)


# ----- encode input formats ------------------------------------------------------------------------------------


@pytest.fixture
def adapter(backbones, tmp_path):
    model = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")
    model.save(str(tmp_path / "adapter"))
    return tmp_path / "adapter", model


def _write_input(path: Path, field: str) -> None:
    suffix = path.suffix
    if suffix == ".json" and field == "text":
        path.write_text(json.dumps(SENTENCES, indent=1), encoding="utf-8")  # an array of strings
    elif suffix == ".json":
        path.write_text(json.dumps([{"id": i, field: s} for i, s in enumerate(SENTENCES)], indent=1), encoding="utf-8")
    elif suffix == ".csv":
        write_csv(path, ["id", field], [[str(i), s] for i, s in enumerate(SENTENCES)])
    else:  # .tsv: tab-split, no quoting
        rows = [["id", field]] + [[str(i), s] for i, s in enumerate(SENTENCES)]
        path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


@pytest.mark.parametrize("name, field", [("in.json", "text"), ("in.json", "body"), ("in.csv", "text"),
                                         ("in.csv", "sentence"), ("in.tsv", "text")])
def test_encode_reads_records_not_raw_lines(adapter, tmp_path, name, field):
    path, model = adapter
    source = tmp_path / name
    _write_input(source, field)
    out = tmp_path / "emb.npy"
    argv = ["encode", "--model", str(path), "--input", str(source), "--output", str(out)]
    assert main(argv + (["--text-field", field] if field != "text" else [])) == 0
    emb = np.load(out)
    assert emb.shape == (len(SENTENCES), 32)  # one row per record: no header row, no "[" or "{" lines
    assert np.allclose(emb, model.encode(SENTENCES), atol=1e-5)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("in.parquet", b"PAR1\x00\x01", r"cannot read \.parquet files\. Supported inputs: \.txt or no suffix"),
        ("in.xml", b"<texts/>", r"cannot read \.xml files\. Supported inputs: .*\.json .*\.csv or \.tsv"),
        ("in.csv", b"id,body\n1,hello\n", r"in\.csv: no column 'text' among \['id', 'body'\]; choose the column "
                                          r"with --text-field"),
        ("in.csv", b"id,text\n1,hello\n2\n", r"in\.csv:3: 1 columns, the header has 2"),
        ("in.json", b'{"text": "hello"}', r"in\.json: expected a JSON array"),
        ("in.json", b'[{"text": "a"},\n {"txt": "b"}]', r"in\.json: element 1: no 'text' field"),
        ("in.json", b'["a",\n "b" "c"]', r"in\.json:2: not valid JSON"),
    ],
)
def test_encode_refuses_what_it_cannot_read(adapter, tmp_path, capsys, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "e.npy"
    assert main(["encode", "--model", str(adapter[0]), "--input", str(source), "--output", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


# ----- a broken GGUF backbone ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"empty\.gguf is empty \(0 bytes\): not a GGUF model"),
        # a header that promises 5 metadata entries, then ends: a truncated download
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 5), r"empty\.gguf could not be read as a GGUF model .*probably truncated"),
    ],
)
def test_empty_or_truncated_gguf(tmp_path, content, message):
    path = tmp_path / "empty.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_backbone(path)


# ----- no FutureWarning on every training step -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_training_step_has_no_past_key_values_warning(backbones, arch):
    model = SuffixPromptEncoder.from_backbone(backbones[arch], num_tokens=4, device="cpu")
    module = model.prompt_module
    module.forward_path = ForwardPath.FAST
    features = module.tokenize(SENTENCES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeddings = module(dict(features))["sentence_embedding"]
        embeddings.pow(2).sum().backward()
    assert module.soft_prompt.grad is not None and torch.isfinite(module.soft_prompt.grad).all()
    about_cache = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert about_cache == []


# ----- packaging -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_license_is_an_spdx_string():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # A table ({text = ...}) makes setuptools >= 77 print a deprecation warning on every install.
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
