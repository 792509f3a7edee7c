"""Training data: (anchor, positive[, negative]) rows from bundled presets or user files, checked and cleaned.

Every loader returns a ``datasets.Dataset`` whose columns are exactly ``anchor, positive`` or
``anchor, positive, negative`` (in that order, all strings): the layout sentence-transformers'
MultipleNegativesRankingLoss reads by position. ``datasets`` and pyarrow are imported inside the functions that read
data, so that PRESETS (names and descriptions, shown by `spt-embed train --help`) imports without them.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spt_embed.datafiles import data_file, parse_score, read_jsonl_fields, read_lines, read_stsb, tsv_rows
from spt_embed.training.columns import COLUMN_HINT, ROLES, refuse_labels, resolve_columns

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

logger = logging.getLogger(__name__)

# Threshold on the 0-5 (STS-B) / 1-5 (SICK) gold scales above which a pair counts as a positive:
# 4 is "mostly equivalent, some unimportant details differ" in the STS annotation guidelines.
MIN_PAIR_SCORE = 4.0
SCORE = "score"  # a graded source's similarity column (0..1), read by the graded loss (TrainConfig.graded_loss)

# load_dataset builder per file suffix, with the reader options it needs.
_FILE_KINDS: dict[str, tuple[str, dict]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    # Only truly empty cells are missing: pandas would otherwise turn texts such as "None", "NA" or "null" into
    # missing values, silently dropping real sentences.
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    ".tsv": ("csv", {"delimiter": "\t", "keep_default_na": False, "na_values": [""]}),
    ".parquet": ("parquet", {}),
}


# ---------------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    """A training set bundled under data_root(): a one-line description and how to read it."""

    name: str
    description: str  # one line, shown by `spt-embed train --help` (no '%': argparse formats help strings)
    path: str  # relative to data_root()
    read: Callable[[Path], datasets.Dataset] = field(repr=False)  # raw rows, already named anchor/positive[/negative]
    # True for asymmetric query -> passage sources: training routes their anchor column through a model's `query`
    # soft prompt and positive/negative through `document` when the model has them.
    retrieval: bool = False

    def load(self, *, limit: int | None = None) -> datasets.Dataset:
        """The preset's rows in the anchor/positive[/negative] schema, cleaned like a user file."""
        path = data_file(self.path)
        raw = self.read(path)
        mapping = {role: role for role in ROLES if role in raw.column_names}
        return _to_schema(raw, f"preset {self.name!r} ({path})", mapping, limit, graded=SCORE in raw.column_names)


def _read_snli_triplets(path: Path) -> datasets.Dataset:
    raw = _read_file(path, str(path))
    missing = [column for column in ("sent0", "sent1", "hard_neg") if column not in raw.column_names]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (found {raw.column_names}); the bundled file is damaged.")
    return raw.select_columns(["sent0", "sent1", "hard_neg"]).rename_columns(
        {"sent0": "anchor", "sent1": "positive", "hard_neg": "negative"}
    )


def _read_mrpc(path: Path) -> datasets.Dataset:
    # Header "Quality  #1 ID  #2 ID  #1 String  #2 String" behind a UTF-8 BOM (utf-8-sig drops it).
    anchors, positives = [], []
    for number, fields_ in tsv_rows(path, min_fields=5, header=True, encoding="utf-8-sig"):
        if fields_[0] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: Quality must be 0 or 1, got {fields_[0]!r}.")
        if fields_[0] == "1":
            anchors.append(fields_[3])
            positives.append(fields_[4])
    return _pairs(anchors, positives)


def _read_stsb_pairs(path: Path) -> datasets.Dataset:
    s1, s2, scores = read_stsb(path)
    keep = [i for i, score in enumerate(scores) if score >= MIN_PAIR_SCORE]
    return _pairs([s1[i] for i in keep], [s2[i] for i in keep])


def _read_stsb_scored(path: Path) -> datasets.Dataset:
    import datasets

    s1, s2, scores = read_stsb(path)
    return datasets.Dataset.from_dict({"anchor": s1, "positive": s2, SCORE: [score / 5.0 for score in scores]})


def _read_sick_pairs(path: Path) -> datasets.Dataset:
    # Header: pair_ID, sentence_A, sentence_B, relatedness_score (1-5), entailment_judgment.
    anchors, positives = [], []
    for number, fields_ in tsv_rows(path, min_fields=4, header=True):
        if parse_score(fields_[3], path, number) >= MIN_PAIR_SCORE:
            anchors.append(fields_[1])
            positives.append(fields_[2])
    return _pairs(anchors, positives)


def _read_coco_pairs(path: Path) -> datasets.Dataset:
    """Same-image caption pairs from a COCO captions JSON: each image's captions in annotation-id order, paired
    (1st, 2nd), (3rd, 4th), ..., so that no caption is in two pairs."""
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
        by_image: dict[int, list[tuple[int, str]]] = {}
        for item in annotations:
            by_image.setdefault(item["image_id"], []).append((item["id"], " ".join(item["caption"].split())))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a COCO captions JSON ({exc!r}); the bundled file is damaged.") from None
    anchors, positives = [], []
    for image in sorted(by_image):
        captions = [text for _, text in sorted(by_image[image])]
        for first, second in zip(captions[0::2], captions[1::2]):
            anchors.append(first)
            positives.append(second)
    return _pairs(anchors, positives)


def _read_sentences(path: Path) -> datasets.Dataset:
    lines = read_lines(path)
    return _pairs(lines, lines)


def _read_jsonl_gz(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) of a gzipped JSON-lines file; a damaged file is a ValueError naming it (and the
    line, for a line that is not a JSON object). Blank lines are skipped; lines are split on '\\n' only."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not gzipped UTF-8 text ({exc}); the bundled file is damaged.") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); the bundled file is damaged.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}; the bundled file "
                             f"is damaged.")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{path} holds no rows; the bundled file is damaged.")
    return rows


def _text_field(row: dict, key: str, path: Path, number: int) -> str:
    """row[key] as a non-empty string; a ValueError naming the file and line otherwise."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}:{number}: field {key!r} must be non-empty text, got {_short_repr(value)}; the "
                         f"bundled file is damaged.")
    return value


def _read_squad_qa(path: Path) -> datasets.Dataset:
    """SQuAD paragraphs (one a line: title, context, qas) as question -> paragraph rows with a hard negative.

    One row per paragraph, its first question as anchor, so that no paragraph is the positive of two rows. The
    negative is the next paragraph of the same article (same title) in file order, wrapping round to the article's
    first; for an article of one paragraph, the first paragraph of the next article (wrapping round to the first)."""
    import datasets

    articles: dict[str, list[int]] = {}  # title -> row indices, in file order
    anchors, positives = [], []
    for number, row in _read_jsonl_gz(path):
        title = _text_field(row, "title", path, number)
        positives.append(_text_field(row, "context", path, number))
        qas = row.get("qas")
        if not isinstance(qas, list) or not qas or not isinstance(qas[0], dict):
            raise ValueError(f"{path}:{number}: 'qas' must be a non-empty list of questions; the bundled file is "
                             f"damaged.")
        anchors.append(_text_field(qas[0], "question", path, number))
        articles.setdefault(title, []).append(len(positives) - 1)
    if len(positives) < 2:
        raise ValueError(f"{path}: {len(positives)} paragraph(s); a hard negative needs at least two.")
    negatives = [""] * len(positives)
    groups = list(articles.values())
    for at, indices in enumerate(groups):
        for k, index in enumerate(indices):
            other = indices[(k + 1) % len(indices)] if len(indices) > 1 else groups[(at + 1) % len(groups)][0]
            negatives[index] = positives[other]
    return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives, "negative": negatives})


def _read_medquad_qa(path: Path) -> datasets.Dataset:
    """MedQuAD (query, passage) pairs. The same question text recurs with different answers across subsets (and a
    few answers under several questions): a row is kept only when neither its question nor its passage is in a row
    kept before it (file order), so that no two rows share a text (a shared one would be a false in-batch negative)."""
    anchors, positives = [], []
    seen_queries: set[str] = set()
    seen_passages: set[str] = set()
    rows = _read_jsonl_gz(path)
    for number, row in rows:
        query = _text_field(row, "query", path, number)
        passage = _text_field(row, "passage", path, number)
        if query in seen_queries or passage in seen_passages:
            continue
        seen_queries.add(query)
        seen_passages.add(passage)
        anchors.append(query)
        positives.append(passage)
    logger.info("%s: %d of %d pairs kept (a repeated question or passage is dropped)", path, len(anchors), len(rows))
    return _pairs(anchors, positives)


def _beir_file(qrels: Path, name: str) -> Path:
    """`name` (queries.jsonl, corpus.jsonl) of the BEIR dataset whose qrels file is `qrels` (<root>/qrels/x.tsv)."""
    path = qrels.parents[1] / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (needed beside {qrels}). Restore it from the repository (data/SHA256SUMS lists every "
            f"file) or point SPT_EMBED_DATA at a complete copy."
        )
    return path


def _read_scifact_train(path: Path) -> datasets.Dataset:
    """SciFact TRAIN claims -> relevant abstract (title + " " + text) from BEIR's qrels/train.tsv, queries.jsonl and
    corpus.jsonl; the test qrels are never read. One row per claim: its first relevant document in qrels order.
    queries.jsonl holds the train and test claims: a train claim whose text is also the text of a query outside the
    train qrels (a test claim: two such in BEIR SciFact) is dropped, and so is a claim text already used."""
    header = read_lines(path)[:1]
    if header != ["query-id\tcorpus-id\tscore"]:
        raise ValueError(f"{path}: expected the BEIR qrels header 'query-id<TAB>corpus-id<TAB>score', got "
                         f"{_short_repr(header[0] if header else '')}; the bundled file is damaged.")
    first_doc: dict[str, str] = {}
    for number, fields_ in tsv_rows(path, min_fields=3, header=True):
        if parse_score(fields_[2], path, number) > 0:
            first_doc.setdefault(fields_[0], fields_[1])
    queries = {row["_id"]: row["text"] for row in read_jsonl_fields(_beir_file(path, "queries.jsonl"), ("_id", "text"))}
    corpus = {row["_id"]: (row["title"], row["text"])
              for row in read_jsonl_fields(_beir_file(path, "corpus.jsonl"), ("_id", "title", "text"))}
    other_texts = {text for key, text in queries.items() if key not in first_doc}
    anchors, positives = [], []
    used: set[str] = set()
    for query, doc in first_doc.items():
        if query not in queries or doc not in corpus:
            raise ValueError(f"{path}: query {query!r} or document {doc!r} is not in queries.jsonl/corpus.jsonl; the "
                             f"bundled files do not match.")
        claim = queries[query]
        if claim in other_texts or claim in used:
            continue
        used.add(claim)
        title, text = corpus[doc]
        anchors.append(claim)
        positives.append(f"{title} {text}".strip())
    logger.info("%s: %d of %d train claims kept (test-claim texts and repeats dropped)", path, len(anchors),
                len(first_doc))
    return _pairs(anchors, positives)


def _pairs(anchors: list[str], positives: list[str]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})


# Only training-safe splits: STS-B dev selects models; STS-B/SICK/SciFact/Banking77 test sets are for reporting
# (scifact-train reads SciFact's train qrels only); SQuAD dev is not bundled.
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "snli-triplets",
            "SNLI dev+test (premise, entailment, contradiction) triplets in SimCSE format, 6339 rows; "
            "do not also evaluate on SNLI.",
            "snli_senteval/snli_devtest_triplets_simcse_format.csv",
            _read_snli_triplets,
        ),
        Preset(
            "mrpc-pairs",
            "MRPC train paraphrase pairs (Quality 1), about 2.8k pairs.",
            "senteval_transfer/MRPC/msr_paraphrase_train.txt",
            _read_mrpc,
        ),
        Preset(
            "stsb-train-pairs",
            "STS-B train pairs with gold score >= 4 of 5, about 1.4k pairs.",
            "stsb/sts-train.csv",
            _read_stsb_pairs,
        ),
        Preset(
            "stsb-train-scored",
            "STS-B train, all 5749 pairs with their gold score scaled to 0..1: a graded source (CoSENT loss).",
            "stsb/sts-train.csv",
            _read_stsb_scored,
        ),
        Preset(
            "sick-train-pairs",
            "SICK train pairs with relatedness >= 4 of 5, about 1.7k pairs. MTEB's SICK-R scores every SICK pair, "
            "train included: an encoder trained on this preset has no clean SICK-R score.",
            "sick/SICK_train.txt",
            _read_sick_pairs,
        ),
        Preset(
            "coco-pairs",
            "COCO 2017 val captions, two captions of the same image as a pair, 10,013 pairs.",
            "coco_captions/captions_val2017.json",
            _read_coco_pairs,
        ),
        Preset(
            "wiki-unsup",
            "11914 Wikipedia sentences as anchor = positive (unsupervised SimCSE); the two views differ only by "
            "dropout, which a frozen backbone lacks, so use it only combined with other data.",
            "wiki1m_prefix/wiki1m_for_simcse.first11914lines.txt",
            _read_sentences,
        ),
        Preset(
            "squad-qa",
            "SQuAD v1.1 train (CC BY-SA 4.0), question -> its Wikipedia paragraph, one question per paragraph, "
            "18,891 rows, another paragraph of the same article as hard negative.",
            "squad_v1.1/train.paragraphs.jsonl.gz",
            _read_squad_qa,
            retrieval=True,
        ),
        Preset(
            "medquad-qa",
            "MedQuAD (CC BY 4.0) medical question -> answer passage, first row per question and per passage, "
            "14,462 rows.",
            "medquad/pairs.jsonl.gz",
            _read_medquad_qa,
            retrieval=True,
        ),
        Preset(
            "scifact-train",
            "SciFact train claims (CC BY-NC 2.0) -> relevant abstract of the BEIR train qrels (title and text), one "
            "row per claim, 805 rows, no test claim; IN-DOMAIN for SciFact: results trained with it are labelled "
            "in-domain.",
            "beir_scifact/qrels/train.tsv",
            _read_scifact_train,
            retrieval=True,
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# Files


def _accepted_forms() -> str:
    return (
        "a preset (" + ", ".join(PRESETS) + "), a .jsonl/.json, .csv, .tsv or .parquet file, or a folder written "
        "by Dataset.save_to_disk"
    )


def _read_file(path: Path, name: str) -> datasets.Dataset:
    """A file or saved-dataset folder as it is, every column kept."""
    import datasets

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(
                f"{name} is a folder but not one written by Dataset.save_to_disk. Training data must be "
                f"{_accepted_forms()}."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            raise ValueError(
                f"{name} holds a DatasetDict with splits {splits}; pass one split's folder, e.g. "
                f"{path / splits[0]}."
            )
        return loaded
    if not path.exists():
        raise FileNotFoundError(f"{name} does not exist. Training data must be {_accepted_forms()}.")
    kind = _FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{name}: unsupported file type {repr(path.suffix) if path.suffix else '(no suffix)'}. Training data "
            f"must be {_accepted_forms()}."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes): no training rows.")
    builder, options = kind
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # the builders raise many types (pandas, pyarrow, DatasetGenerationError)
        raise ValueError(_unreadable(path, name, exc)) from exc
    if len(loaded) == 0:
        raise ValueError(f"{name} holds no rows (columns {loaded.column_names}): no training rows.")
    return loaded


def _unreadable(path: Path, name: str, exc: Exception) -> str:
    """Why a text file failed to load, as precisely as a second look finds: no rows, or the first line that is not
    JSON; otherwise the reader's own error (which names no line)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return f"{name}: could not be read as parquet ({exc})."
    lines = [(number, line) for number, line in enumerate(read_lines(path), start=1) if line.strip()]
    if len(lines) <= (suffix in (".csv", ".tsv")):  # nothing, or a csv/tsv header alone
        return f"{name} holds no rows{' (only a header)' if lines else ''}: no training rows."
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data" after the first value: JSON Lines, checked line by line below
                return f"{name}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})."
        else:
            rows = rows if isinstance(rows, list) else []
            bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
            if bad is not None:
                return f"{name}: element {bad} of the JSON array is a {type(rows[bad]).__name__}, expected an object."
            return f"{name}: could not be read as json ({exc})."
    if suffix in (".json", ".jsonl"):
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"{name}:{number}: not valid JSON ({error.msg}, column {error.colno}). Fix or remove the line."
            if not isinstance(row, dict):
                return f"{name}:{number}: expected a JSON object (one row per line), got {type(row).__name__}."
    return f"{name}: could not be read as {suffix[1:]} ({exc})."


# ---------------------------------------------------------------------------------------------------------------
# Validation and cleaning

_STRING_DTYPES = {"string", "large_string", "string_view"}


def _short_repr(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _text_column(dataset: datasets.Dataset, table: pa.Table, column: str, name: str) -> pa.ChunkedArray:
    """`column` as Arrow strings (nulls allowed); ValueError at the first value that is not text."""
    import datasets
    import pyarrow as pa

    feature = dataset.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES:
        # Normalised to one string type so that sources can be concatenated (string vs large_string would clash).
        return table.column(column).cast(pa.string())
    if isinstance(feature, datasets.Value) and feature.dtype == "null":
        return pa.chunked_array([pa.nulls(len(table), pa.string())])
    # Anything else (numbers, lists, mixed-type JSON columns): decode and find the first non-text value.
    values = list(dataset[column])
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{name}: row {index + 1}, column {column!r}: expected text, got {type(value).__name__} "
                f"({_short_repr(value)}). Every anchor/positive/negative value must be a string; if this is not a "
                f"text column: {COLUMN_HINT}"
            )
    return pa.chunked_array([pa.array(values, pa.string())])


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")


def _to_schema(
    dataset: datasets.Dataset,
    name: str,
    mapping: dict[str, str],
    limit: int | None,
    unproven: dict[str, str] | None = None,
    *,
    graded: bool = False,
) -> datasets.Dataset:
    """Validate the mapped columns, drop rows with empty text, keep the first `limit` rows, rename to the roles.

    `unproven`: role -> how its column was chosen ("taken by position", "named"), for columns whose name does not
    say they hold text: each must not be a column of class labels. `graded`: the source's `score` column (numbers
    in 0..1) is kept too, beside anchor and positive."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    _check_limit(limit)
    # Arrow format honours any indices mapping (a saved shuffled/selected dataset) and reads without copying.
    table = dataset.with_format("arrow")[:]
    columns = {role: _text_column(dataset, table, source, name) for role, source in mapping.items()}
    for role, how in (unproven or {}).items():
        refuse_labels(columns[role], name, role, mapping[role], how, list(dataset.column_names))
    total = len(table)
    keep = None
    for column in columns.values():
        present = pc.and_(pc.is_valid(column), pc.not_equal(pc.utf8_trim_whitespace(column), ""))
        present = pc.fill_null(present, False)
        keep = present if keep is None else pc.and_(keep, present)
    kept = int(pc.sum(keep).as_py() or 0) if total else 0
    if kept == 0:
        raise ValueError(
            f"{name}: no usable rows: all {total} rows have an empty or missing "
            f"{'/'.join(repr(source) for source in dict.fromkeys(mapping.values()))}."
        )
    if kept < total:
        logger.warning("%s: dropped %d of %d rows with empty text", name, total - kept, total)
    if graded:
        if "negative" in mapping:
            raise ValueError(f"{name}: a graded source (with a {SCORE!r} column) has pairs, not triplets; drop the "
                             f"negative column {mapping['negative']!r} or the {SCORE!r} column.")
        columns[SCORE] = _score_column(dataset, table, name)
    cleaned = pa.table(columns).filter(keep)
    if limit is not None:
        cleaned = cleaned.slice(0, limit)
    return datasets.Dataset.from_dict({role: cleaned.column(role) for role in columns})


def _score_column(dataset: datasets.Dataset, table: pa.Table, name: str) -> pa.ChunkedArray:
    """The `score` column as float32; ValueError at the first value that is not a number in [0, 1]."""
    import math

    import pyarrow as pa

    values = list(dataset[SCORE])
    for index, value in enumerate(values):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{name}: row {index + 1}, column {SCORE!r}: expected a similarity in [0, 1], got {value!r}. A "
                f"{SCORE!r} column makes the source graded (trained with the graded loss); scale the scores to "
                f"0..1 (e.g. STS 0-5 divided by 5), or rename the column if it is not a similarity."
            )
    return pa.chunked_array([pa.array(values, pa.float32())])


# ---------------------------------------------------------------------------------------------------------------
# Public loaders


def load_pairs(
    source: str | os.PathLike,
    *,
    anchor: str | None = None,
    positive: str | None = None,
    negative: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """One training source as a Dataset with columns anchor, positive[, negative] (strings, no empty text).

    `source` is a preset name (see PRESETS; a preset wins over a same-named path, write ./name for the path) or a
    .jsonl/.json, .csv, .tsv or .parquet file, or a Dataset.save_to_disk folder. `anchor`/`positive`/`negative`
    name the file's columns; unnamed ones are found by their known names (see training/columns.py; else only a
    file of exactly two columns is taken in order), a negative only when no column is named. A column taken by
    position or named here that holds a handful of short class labels is an error. Rows with an empty or missing
    text are dropped (one warning); non-text values are an error naming the row (1-based, header not counted) and
    column. A `score` column (similarities in 0..1) makes the source graded: it is kept beside anchor and positive
    and trained with the graded loss. `limit` keeps the first rows after cleaning.
    """
    if isinstance(source, str) and source in PRESETS:
        if anchor is not None or positive is not None or negative is not None:
            raise ValueError(
                f"Preset {source!r} already has anchor/positive columns; column names apply to files only."
            )
        return PRESETS[source].load(limit=limit)
    _check_limit(limit)
    name = os.fspath(source)
    raw = _read_file(Path(name).expanduser(), name)
    mapping, by_position = resolve_columns(list(raw.column_names), name, anchor, positive, negative)
    if by_position:
        logger.info(
            "%s: no recognised column names; using the columns in order: %s",
            name,
            ", ".join(f"{role}={column!r}" for role, column in mapping.items()),
        )
        unproven = dict.fromkeys(mapping, "taken by position")
    else:
        named = dict(zip(ROLES, (anchor, positive, negative)))
        unproven = {role: "named" for role in mapping if named[role] is not None}
    return _to_schema(raw, name, mapping, limit, unproven, graded=SCORE in raw.column_names)
