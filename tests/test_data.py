"""Training-data loading: file formats, column mapping, validation, cleaning, presets on the bundled data/, one
dataset per training source; the data folder and its STS-B reader."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest

from spt_embed import datafiles
from spt_embed.datafiles import data_root, load_sts
from spt_embed.training import data
from spt_embed.training.data import PRESETS, load_pairs
from spt_embed.training.train import load_datasets
from spt_embed.training.train_config import TrainConfig

DATA = Path(__file__).resolve().parents[1] / "data"

ROWS = [
    {"anchor": "A man plays a flute.", "positive": "A man is playing a flute.", "negative": "A dog sleeps."},
    {"anchor": "The cat eats.", "positive": "A cat is eating food.", "negative": "Nobody is eating."},
    {"anchor": "Kids run in the park.", "positive": "Children are running outside.", "negative": "Kids sit indoors."},
]


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path, monkeypatch):
    """load_dataset writes Arrow caches; keep them out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def write(path: Path, rows: list[dict]) -> Path:
    """Write `rows` in the format given by `path`'s suffix (a suffix-less path: a save_to_disk folder)."""
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(path))
    return path


def file_rows(path: Path, *, encoding: str = "utf-8", header: bool = False) -> list[list[str]]:
    """Tab-split lines of a bundled file (an independent reader for the checks)."""
    with open(path, encoding=encoding, newline="") as handle:
        lines = [line.rstrip("\r\n") for line in handle]
    return [line.split("\t") for line in (lines[1:] if header else lines) if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Formats and columns


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.csv", "pairs.tsv", "pairs.parquet", "saved"])
@pytest.mark.parametrize("with_negative", [True, False])
def test_formats_round_trip(tmp_path, name, with_negative):
    rows = ROWS if with_negative else [{k: v for k, v in r.items() if k != "negative"} for r in ROWS]
    loaded = load_pairs(write(tmp_path / name, rows))
    expected = ["anchor", "positive", "negative"] if with_negative else ["anchor", "positive"]
    assert loaded.column_names == expected
    assert loaded.to_list() == rows
    assert all(loaded.features[c] == datasets.Value("string") for c in expected)


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["sent0", "sent1", "hard_neg"], ["sent0", "sent1", "hard_neg"]),
        (["sent0", "sent1"], ["sent0", "sent1"]),
        (["query", "pos", "neg"], ["query", "pos", "neg"]),
        (["query", "positive", "negative"], ["query", "positive", "negative"]),
        (["id", "sentence1", "sentence2", "label"], ["sentence1", "sentence2"]),
        (["text1", "text2", "similarity", "source"], ["text1", "text2"]),
        # literal names win over aliases, whatever the column order
        (["negative", "sent0", "positive", "anchor", "sent1"], ["anchor", "positive", "negative"]),
        (["question", "answer"], ["question", "answer"]),  # 2 unknown columns: in order
    ],
)
def test_column_auto_detection(tmp_path, caplog, columns, expected):
    rows = [{c: f"{c} text {i}" for c in columns} for i in range(3)]
    with caplog.at_level(logging.INFO, logger="spt_embed.training.data"):
        loaded = load_pairs(write(tmp_path / "pairs.jsonl", rows))
    assert loaded.column_names == list(data.ROLES[: len(expected)])
    assert loaded[0] == {role: f"{c} text 0" for role, c in zip(data.ROLES, expected)}
    in_order = columns == ["question", "answer"]
    assert ("using the columns in order" in caplog.text) == in_order


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"anchor": "q", "positive": "d"}, {"anchor": "q", "positive": "d"}),
        ({"anchor": "q", "positive": "d", "negative": "n"}, {"anchor": "q", "positive": "d", "negative": "n"}),
        ({"anchor": "d", "positive": "q"}, {"anchor": "d", "positive": "q"}),  # swapping is fine
        ({"anchor": "d", "positive": "d"}, {"anchor": "d", "positive": "d"}),  # SimCSE-unsupervised style
        # unnamed anchor/positive come from the usual names; a negative only when named
        ({"negative": "n"}, {"anchor": "sent0", "positive": "sent1", "negative": "n"}),
        ({"anchor": "q"}, {"anchor": "q", "positive": "sent1"}),
    ],
)
def test_explicit_column_mapping(tmp_path, kwargs, expected):
    rows = [{"q": "query", "d": "doc", "n": "neg", "sent0": "s0", "sent1": "s1", "hard_neg": "hn", "x": 1}] * 2
    loaded = load_pairs(write(tmp_path / "pairs.csv", rows), **kwargs)
    assert loaded.column_names == list(expected)
    assert loaded[0] == {role: rows[0][column] for role, column in expected.items()}


def test_missing_column_error(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError) as info:
        load_pairs(path, anchor="question", positive="reply")
    message = str(info.value)
    assert str(path) in message and "'reply'" in message and "positive" in message
    assert "['question', 'answer']" in message
    assert "--anchor-column/--positive-column/--negative-column" in message and "positive=" in message


# 3 unknown columns are not taken in order: a premise/hypothesis/label file would train on the label as negative.
@pytest.mark.parametrize("columns", [["only"], ["q", "d", "hn"], ["a", "b", "c", "d"]])
def test_undetectable_columns(tmp_path, columns):
    path = write(tmp_path / "pairs.jsonl", [{c: "x" for c in columns}])
    with pytest.raises(ValueError, match=r"cannot tell which columns.*--anchor-column"):
        load_pairs(path)


# ---------------------------------------------------------------------------------------------------------------
# Validation and cleaning


def test_non_text_value_names_file_row_and_column(tmp_path):
    lines = [{"anchor": f"a{i}", "positive": None} for i in range(6)] + [{"anchor": "a6", "positive": 42}]
    path = write(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(ValueError, match=r"pairs\.jsonl: row 7, column 'positive': expected text, got int \(42\)"):
        load_pairs(path)


@pytest.mark.parametrize(
    "name, rows, message",
    [
        # a mixed-type JSON column: only the offending row is reported
        ("pairs.jsonl", [{"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": [1, 2]}],
         r"row 2, column 'positive': expected text, got list \(\[1, 2\]\)"),
        # a numeric CSV column (e.g. a score mapped by mistake) points at the mapping
        ("pairs.csv", [{"anchor": "a", "positive": 3}],
         r"pairs\.csv: row 1, column 'positive': expected text, got int"),
        ("pairs.parquet", [{"anchor": "a", "positive": 0.5}], r"row 1, column 'positive': expected text, got float"),
    ],
)
def test_non_text_values(tmp_path, name, rows, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path / name, rows))


def test_empty_rows_dropped_and_counted(tmp_path, caplog):
    rows = [
        {"anchor": "a1", "positive": "p1"},
        {"anchor": "", "positive": "p2"},
        {"anchor": "a3", "positive": "   \t"},
        {"anchor": None, "positive": "p4"},
        {"anchor": "a5", "positive": "p5"},
    ]
    with caplog.at_level(logging.WARNING, logger="spt_embed.training.data"):
        loaded = load_pairs(write(tmp_path / "pairs.jsonl", rows))
    assert loaded.to_list() == [rows[0], rows[4]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 3 of 5 rows with empty text" in warnings[0]


def test_csv_keeps_texts_pandas_would_call_missing(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("anchor,positive\nNone,NA\nnull,\n", encoding="utf-8")
    assert load_pairs(path).to_list() == [{"anchor": "None", "positive": "NA"}]


def test_all_empty_is_an_error(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [{"anchor": " ", "positive": "p"}, {"anchor": "a", "positive": None}])
    with pytest.raises(ValueError, match="no usable rows"):
        load_pairs(path)


def test_limit_after_cleaning(tmp_path):
    rows = [{"anchor": f"a{i}" if i % 2 else "", "positive": f"p{i}"} for i in range(10)]
    loaded = load_pairs(write(tmp_path / "pairs.parquet", rows), limit=3)
    assert loaded["anchor"] == ["a1", "a3", "a5"]
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_pairs(tmp_path / "pairs.parquet", limit=0)


def test_bad_sources(tmp_path):
    (tmp_path / "pairs.txt").write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*snli-triplets.*save_to_disk"):
        load_pairs(tmp_path / "pairs.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist.*wiki-unsup.*\.parquet"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by Dataset.save_to_disk"):
        load_pairs(tmp_path / "folder")
    dataset = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\]"):
        load_pairs(tmp_path / "dict")
    assert load_pairs(tmp_path / "dict" / "train").num_rows == 3
    with pytest.raises(ValueError, match="column names apply to files only"):
        load_pairs("mrpc-pairs", anchor="x")


def test_saved_dataset_with_indices_mapping(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS * 2).select([5, 0])  # select keeps an indices mapping
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_pairs(tmp_path / "saved").to_list() == [ROWS[2], ROWS[0]]


# ---------------------------------------------------------------------------------------------------------------
# Presets on the bundled data


def test_snli_triplets_preset():
    loaded = load_pairs("snli-triplets")
    assert loaded.column_names == ["anchor", "positive", "negative"] and loaded.num_rows == 6339
    frame = pd.read_csv(DATA / "snli_senteval/snli_devtest_triplets_simcse_format.csv", keep_default_na=False)
    assert loaded[0] == {"anchor": frame.sent0[0], "positive": frame.sent1[0], "negative": frame.hard_neg[0]}


def test_mrpc_pairs_preset():
    loaded = load_pairs("mrpc-pairs")
    frame = pd.read_csv(
        DATA / "senteval_transfer/MRPC/msr_paraphrase_train.txt", sep="\t", quoting=3, encoding="utf-8-sig"
    )
    positives = frame[frame.Quality == 1]
    assert loaded.column_names == ["anchor", "positive"] and loaded.num_rows == len(positives) == 2753
    assert loaded["anchor"] == positives["#1 String"].tolist()
    assert loaded["positive"] == positives["#2 String"].tolist()


def test_stsb_train_pairs_preset():
    loaded = load_pairs("stsb-train-pairs")
    rows = file_rows(DATA / "stsb/sts-train.csv")
    assert len(rows) == 5749
    expected = [(f[5], f[6]) for f in rows if float(f[4]) >= 4.0]
    assert loaded.column_names == ["anchor", "positive"]
    assert list(zip(loaded["anchor"], loaded["positive"])) == expected
    # every chosen pair really scores >= 4, and nothing above the threshold was left out
    scores = {(f[5], f[6]): float(f[4]) for f in rows}
    assert min(scores[pair] for pair in expected) >= 4.0
    assert 1000 < loaded.num_rows < len(rows)


def test_sick_train_pairs_preset():
    loaded = load_pairs("sick-train-pairs")
    rows = file_rows(DATA / "sick/SICK_train.txt", header=True)
    assert len(rows) == 4500
    expected = [(f[1], f[2]) for f in rows if float(f[3]) >= 4.0]
    assert loaded.column_names == ["anchor", "positive"]
    assert list(zip(loaded["anchor"], loaded["positive"])) == expected and 1000 < len(expected) < 4500


def test_wiki_unsup_preset():
    loaded = load_pairs("wiki-unsup")
    assert loaded.column_names == ["anchor", "positive"] and loaded.num_rows == 11914
    assert loaded["anchor"] == loaded["positive"]
    assert loaded[0]["anchor"] == "YMCA in South Australia"


def test_coco_pairs_preset():
    loaded = load_pairs("coco-pairs")
    annotations = json.loads((DATA / "coco_captions/captions_val2017.json").read_text())["annotations"]
    assert len(annotations) == 25014
    by_image = {}
    for item in sorted(annotations, key=lambda item: item["id"]):
        by_image.setdefault(item["image_id"], []).append(" ".join(item["caption"].split()))
    assert loaded.column_names == ["anchor", "positive"] and loaded.num_rows == 10013
    # each pair: two captions of one image, next to each other in id order; no caption used twice
    first = by_image[min(by_image)]
    assert (loaded[0]["anchor"], loaded[0]["positive"]) == (first[0], first[1])
    assert (loaded[1]["anchor"], loaded[1]["positive"]) == (first[2], first[3])
    images_of = {}  # a few captions (e.g. "A kitchen with a stove.") describe several images
    for image, texts in by_image.items():
        for text in texts:
            images_of.setdefault(text, set()).add(image)
    assert all(images_of[a] & images_of[p] for a, p in zip(loaded["anchor"], loaded["positive"]))
    assert sum(len(texts) // 2 for texts in by_image.values()) == loaded.num_rows


def gzip_jsonl(path: Path) -> list[dict]:
    """Rows of a bundled gzipped JSON-lines file (an independent reader for the checks)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def no_empty_text(loaded: datasets.Dataset) -> bool:
    return all(text.strip() for column in loaded.column_names for text in loaded[column])


def test_squad_qa_preset():
    loaded = load_pairs("squad-qa")
    paragraphs = gzip_jsonl(DATA / "squad_v1.1/train.paragraphs.jsonl.gz")
    assert len(paragraphs) == 18891 and sum(len(p["qas"]) for p in paragraphs) == 87599
    assert loaded.column_names == ["anchor", "positive", "negative"] and loaded.num_rows == 18891
    assert no_empty_text(loaded)
    # one row per paragraph, its first question; no paragraph is the positive of two rows
    assert loaded["anchor"] == [p["qas"][0]["question"] for p in paragraphs]
    assert loaded["positive"] == [p["context"] for p in paragraphs]
    assert len(set(loaded["positive"])) == loaded.num_rows
    # the negative: another paragraph of the same article (every article has several), the next one wrapping round
    title_of = {p["context"]: p["title"] for p in paragraphs}
    size = {}
    for p in paragraphs:
        size[p["title"]] = size.get(p["title"], 0) + 1
    for positive, negative in zip(loaded["positive"], loaded["negative"]):
        assert negative != positive
        if size[title_of[positive]] > 1:
            assert title_of[negative] == title_of[positive]
    assert loaded[0]["negative"] == paragraphs[1]["context"] and paragraphs[1]["title"] == paragraphs[0]["title"]
    last = max(i for i, p in enumerate(paragraphs) if p["title"] == paragraphs[0]["title"])
    assert loaded[last]["negative"] == paragraphs[0]["context"]


def test_squad_article_of_one_paragraph_takes_the_next_article(tmp_path, monkeypatch):
    rows = [
        {"title": "A", "context": "a1", "qas": [{"question": "qa1"}, {"question": "qa1b"}]},
        {"title": "B", "context": "b1", "qas": [{"question": "qb1"}]},
        {"title": "C", "context": "c1", "qas": [{"question": "qc1"}]},
        {"title": "C", "context": "c2", "qas": [{"question": "qc2"}]},
        {"title": "D", "context": "d1", "qas": [{"question": "qd1"}]},
    ]
    (tmp_path / "squad_v1.1").mkdir()
    (tmp_path / "squad_v1.1/train.paragraphs.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode())
    )
    monkeypatch.setenv("SPT_EMBED_DATA", str(tmp_path))
    loaded = load_pairs("squad-qa")
    assert loaded["anchor"] == ["qa1", "qb1", "qc1", "qc2", "qd1"]
    assert loaded["negative"] == ["b1", "c1", "c2", "c1", "a1"]


@pytest.mark.parametrize(
    "preset, relative", [("squad-qa", "squad_v1.1/train.paragraphs.jsonl.gz"), ("medquad-qa", "medquad/pairs.jsonl.gz")]
)
@pytest.mark.parametrize(
    "content, message",
    [
        (b"not gzip at all", "not gzipped UTF-8 text.*damaged"),
        (gzip.compress(b'{"title": "T"')[:-6], "not gzipped UTF-8 text.*damaged"),  # truncated
        (gzip.compress(b'{"a": 1}\n{oops\n'), r":2: not valid JSON.*damaged"),
        (gzip.compress(b'["a", "b"]\n'), r":1: expected a JSON object, got list"),
        (gzip.compress(b'{"title": "T", "context": "", "query": "", "qas": []}\n'), "must be non-empty text"),
    ],
)
def test_damaged_gzip_presets_are_refused(tmp_path, monkeypatch, preset, relative, content, message):
    (tmp_path / relative).parent.mkdir(parents=True)
    (tmp_path / relative).write_bytes(content)
    monkeypatch.setenv("SPT_EMBED_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        load_pairs(preset)


def test_medquad_qa_preset():
    loaded = load_pairs("medquad-qa")
    pairs = gzip_jsonl(DATA / "medquad/pairs.jsonl.gz")
    assert len(pairs) == 16359
    assert loaded.column_names == ["anchor", "positive"] and loaded.num_rows == 14462
    assert no_empty_text(loaded)
    # no two rows share a text: each question and each passage once, the first in file order
    assert len(set(loaded["anchor"])) == len(set(loaded["positive"])) == loaded.num_rows
    assert not set(loaded["anchor"]) & set(loaded["positive"])
    # in file order, a pair is kept when neither its question nor its passage is in a pair kept before it
    kept, texts = [], set()
    for p in pairs:
        if p["query"] not in texts and p["passage"] not in texts:
            texts.update((p["query"], p["passage"]))
            kept.append((p["query"], p["passage"]))
    assert list(zip(loaded["anchor"], loaded["positive"])) == kept
    # 875 questions recur (mostly with another subset's answer), 53 passages answer several questions
    assert sum(n > 1 for n in Counter(p["query"] for p in pairs).values()) == 875
    assert sum(n > 1 for n in Counter(p["passage"] for p in pairs).values()) == 53


def beir_qrels(name: str) -> list[list[str]]:
    rows = file_rows(DATA / f"beir_scifact/qrels/{name}", header=False)
    assert rows[0] == ["query-id", "corpus-id", "score"]
    return rows[1:]


def test_scifact_train_preset_is_disjoint_from_the_test_queries():
    loaded = load_pairs("scifact-train")
    assert loaded.column_names == ["anchor", "positive"] and loaded.num_rows == 805
    assert no_empty_text(loaded) and len(set(loaded["anchor"])) == loaded.num_rows
    queries = {}
    for line in (DATA / "beir_scifact/queries.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        queries[row["_id"]] = row["text"]
    corpus = {}
    for line in (DATA / "beir_scifact/corpus.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        corpus[row["_id"]] = row["title"] + " " + row["text"]
    train = beir_qrels("train.tsv")
    first_doc = {}
    for query, doc, _ in train:
        first_doc.setdefault(query, doc)
    assert len(train) == 919 and len(first_doc) == 809
    # the test qrels are read here only to check that no test claim (by id or by text) is trained on
    test_ids = {query for query, _, _ in beir_qrels("test.tsv")}
    test_texts = {queries[query] for query in test_ids}
    assert len(test_ids) == 300 and not set(first_doc) & test_ids
    assert not set(loaded["anchor"]) & test_texts
    # 809 train claims: 2 have the text of a test claim (dropped), 2 repeat an earlier train claim's text (dropped)
    assert len({queries[query] for query in first_doc} & test_texts) == 2
    kept, seen = [], set()
    for query in first_doc:
        if queries[query] not in test_texts and queries[query] not in seen:
            seen.add(queries[query])
            kept.append(query)
    assert len(kept) == 805
    assert loaded["anchor"] == [queries[query] for query in kept]
    assert loaded["positive"] == [corpus[first_doc[query]] for query in kept]


def test_coco_file_that_is_not_coco_is_refused(tmp_path, monkeypatch):
    (tmp_path / "coco_captions").mkdir()
    (tmp_path / "coco_captions/captions_val2017.json").write_text('{"images": []}')
    monkeypatch.setenv("SPT_EMBED_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="not a COCO captions JSON.*damaged"):
        load_pairs("coco-pairs")


def test_presets_are_described_and_avoid_evaluation_splits():
    assert set(PRESETS) == {
        "snli-triplets", "mrpc-pairs", "stsb-train-pairs", "stsb-train-scored", "sick-train-pairs", "coco-pairs",
        "wiki-unsup", "squad-qa", "medquad-qa", "scifact-train",
    }
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.description and "\n" not in preset.description and "%" not in preset.description
        evaluation = ("sts-dev", "sts-test", "SICK_test", "qrels/test", "squad_v1.1/dev", "banking77")
        assert not any(s in preset.path for s in evaluation)
        assert preset.path == "beir_scifact/qrels/train.tsv" or "beir_scifact" not in preset.path
    # query -> passage sources are marked for the query/document soft prompts; the symmetric ones are not
    assert {name for name, preset in PRESETS.items() if preset.retrieval} == {"squad-qa", "medquad-qa", "scifact-train"}
    in_domain = "IN-DOMAIN for SciFact: results trained with it are labelled in-domain"
    assert in_domain in PRESETS["scifact-train"].description
    assert not (DATA / "squad_v1.1/dev.paragraphs.jsonl.gz").exists()  # only SQuAD train is bundled


def test_bundled_files_match_sha256sums():
    listed = {}
    for line in (DATA / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, path = line.split("  ", 1)
        assert path.startswith("./") and path not in listed
        listed[path[2:]] = digest
    for relative in ("squad_v1.1/train.paragraphs.jsonl.gz", "medquad/pairs.jsonl.gz"):
        assert hashlib.sha256((DATA / relative).read_bytes()).hexdigest() == listed[relative]
    for preset in PRESETS.values():
        assert preset.path in listed


def test_preset_limit():
    assert load_pairs("wiki-unsup", limit=5)["anchor"] == load_pairs("wiki-unsup")["anchor"][:5]


# ---------------------------------------------------------------------------------------------------------------
# Several sources


def sources(paths, **options) -> TrainConfig:
    """A training config over `paths`; batches of 1 so that tiny files are enough."""
    return TrainConfig(data=[str(p) for p in paths], batch_size=1, **options)


def test_each_source_is_its_own_dataset(tmp_path, caplog):
    triplets = write(tmp_path / "triplets.jsonl", ROWS)
    pairs = write(tmp_path / "pairs.csv", [{"sentence1": f"s{i}", "sentence2": f"t{i}"} for i in range(20)])
    with caplog.at_level(logging.INFO, logger="spt_embed.training.train"):
        loaded = load_datasets(sources([triplets, pairs]))
    assert "Training source" in caplog.text and "20 rows" in caplog.text
    # Every batch comes from one source, so each keeps its own layout: the hard negatives stay.
    assert list(loaded) == ["triplets", "pairs"]
    assert loaded["triplets"].column_names == ["anchor", "positive", "negative"]
    assert loaded["triplets"].to_list() == ROWS
    assert loaded["pairs"].column_names == ["anchor", "positive"]
    assert loaded["pairs"].to_list() == [{"anchor": f"s{i}", "positive": f"t{i}"} for i in range(20)]
    limited = load_datasets(sources([triplets, pairs], max_samples=2))  # the first rows of every source
    assert {name: part.to_list() for name, part in limited.items()} == {
        name: part.to_list()[:2] for name, part in loaded.items()
    }
    # One source: the dataset itself; the same name twice: kept apart.
    assert load_datasets(sources([pairs])).to_list() == loaded["pairs"].to_list()
    assert list(load_datasets(sources([pairs, pairs]))) == ["pairs", "pairs_"]


def test_sources_with_negatives_keep_them(tmp_path):
    triplets = write(tmp_path / "triplets.jsonl", ROWS)
    loaded = load_datasets(sources([triplets, "snli-triplets"]))
    assert list(loaded) == ["triplets", "snli_triplets"]
    assert [(part.column_names, part.num_rows) for part in loaded.values()] == [
        (["anchor", "positive", "negative"], 3),
        (["anchor", "positive", "negative"], 6339),
    ]


def test_training_column_names_apply_to_files_only(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"q": "question", "a": "answer", "id": "1", "x": "y"}])
    loaded = load_datasets(sources([path], anchor_column="q", positive_column="a"))
    assert loaded.to_list() == [{"anchor": "question", "positive": "answer"}]
    with pytest.raises(ValueError, match="column names apply to files only"):
        load_datasets(sources([path, "mrpc-pairs"], anchor_column="q", positive_column="a"))


def test_training_source_errors(tmp_path):
    with pytest.raises(ValueError, match="No training data"):
        sources([])
    empty = write(tmp_path / "empty.jsonl", [{"anchor": " ", "positive": "p"}, {"anchor": "a", "positive": None}])
    with pytest.raises(ValueError, match="no usable rows"):
        load_datasets(sources([write(tmp_path / "ok.jsonl", ROWS), empty]))
    with pytest.raises(ValueError, match=r"ok\.jsonl has 3 usable rows, fewer than one batch \(4\)"):
        load_datasets(TrainConfig(data=[str(tmp_path / "ok.jsonl")], batch_size=4))


def test_presets_import_without_heavy_packages():
    """`spt-embed train --help` lists the presets: their table must not pull datasets, pyarrow or torch."""
    code = (
        "import sys; from spt_embed.training.data import PRESETS; import spt_embed.datafiles; "
        "print(len(PRESETS), sorted(m for m in ('datasets', 'pyarrow', 'torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["10", "[]"]


# ---------------------------------------------------------------------------------------------------------------
# STS-B and the data root


@pytest.mark.parametrize("split, count", [("dev", 1500), ("test", 1379), ("train", 5749)])
def test_load_sts(split, count):
    s1, s2, scores = load_sts(split)
    assert len(s1) == len(s2) == len(scores) == count
    assert all(isinstance(s, float) and 0.0 <= s <= 5.0 for s in scores)
    assert min(scores) == 0.0 and max(scores) == 5.0
    first = file_rows(DATA / f"stsb/sts-{split}.csv")[0]
    assert (s1[0], s2[0], scores[0]) == (first[5], first[6], float(first[4]))


def test_load_sts_bad_split():
    with pytest.raises(ValueError, match="choose one of train, dev, test"):
        load_sts("validation")


def test_data_root_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv(datafiles.DATA_ENV, raising=False)
    assert data_root() == DATA
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "sts-dev.csv").write_text(
        "g\tf\t2012\t0001\t3.5\tA b.\tC d.\tx\ty\n\ng\tf\t2012\t0002\t1\tE f.\tG h.\n", encoding="utf-8"
    )
    monkeypatch.setenv(datafiles.DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert load_sts("dev") == (["A b.", "E f."], ["C d.", "G h."], [3.5, 1.0])
    with pytest.raises(FileNotFoundError, match=r"stsb/sts-test\.csv is missing.*SPT_EMBED_DATA"):
        load_sts("test")
    with pytest.raises(FileNotFoundError, match=r"wiki1m_prefix/.*is missing"):
        load_pairs("wiki-unsup")
    monkeypatch.setenv(datafiles.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"absent \(from \$SPT_EMBED_DATA\) does not exist.*Set SPT_EMBED_DATA"):
        data_root()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs("snli-triplets")


def test_scifact_documents_join_title_and_text_in_file_order(tmp_path, monkeypatch):
    from spt_embed.datafiles import scifact_documents

    assert scifact_documents(2) == scifact_documents()[:2]
    (tmp_path / "beir_scifact").mkdir()
    (tmp_path / "beir_scifact" / "corpus.jsonl").write_text(
        '{"_id": "1", "title": "T", "text": "a b"}\n\n{"_id": "2", "title": "", "text": "c"}\n{"_id": "3", "title": "U", "text": "d"}\n',
        encoding="utf-8",
    )
    monkeypatch.setenv(datafiles.DATA_ENV, str(tmp_path))
    assert scifact_documents() == ["T a b", "c", "U d"]
    assert scifact_documents(2) == ["T a b", "c"]
    (tmp_path / "beir_scifact" / "corpus.jsonl").write_text('{"_id": "1", "text": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1: fields \['title'\] missing"):
        scifact_documents()


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"_id": "1", "text": "a"}\n{"_id": 2, "text": "b"}\n', r"x\.jsonl:2: fields \['_id', 'text'\] must be strings"),
        ('{"_id": "1"}\n', r"x\.jsonl:1: fields \['text'\] missing"),
        ('{"_id": "1", "text": \n', r"x\.jsonl:1: not valid JSON"),
        ('["_id"]\n', r"x\.jsonl:1: expected a JSON object"),
    ],
)
def test_beir_jsonl_reader_names_the_bad_line(tmp_path, content, error):
    from spt_embed.datafiles import read_jsonl_fields

    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=error):
        read_jsonl_fields(path, ("_id", "text"))
    assert path.read_text(encoding="utf-8") == content  # nothing written
