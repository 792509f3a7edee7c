"""Training data: (anchor, positive[, negative]) rows from bundled presets or user files, checked and cleaned.

Every loader returns a ``datasets.Dataset`` whose columns are exactly ``anchor, positive`` or
``anchor, positive, negative`` (in that order, all strings): the layout sentence-transformers'
MultipleNegativesRankingLoss reads by position. ``datasets`` and pyarrow are imported inside the functions that read
data, so that PRESETS (names and descriptions, shown by `spt-embed train --help`) imports without them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spt_embed.datafiles import data_file, parse_score, read_lines, read_stsb, tsv_rows

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

logger = logging.getLogger(__name__)

ROLES = ("anchor", "positive", "negative")
# Threshold on the 0-5 (STS-B) / 1-5 (SICK) gold scales above which a pair counts as a positive:
# 4 is "mostly equivalent, some unimportant details differ" in the STS annotation guidelines.
MIN_PAIR_SCORE = 4.0

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

# Column names recognised without --*-column flags, tried in order: (label, anchor, positive, negative) names.
_ALIASES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("anchor/positive[/negative]", ("anchor",), ("positive",), ("negative",)),
    ("sent0/sent1[/hard_neg] (SimCSE)", ("sent0",), ("sent1",), ("hard_neg",)),
    ("query/positive|pos[/negative|neg]", ("query",), ("positive", "pos"), ("negative", "neg")),
    ("sentence1/sentence2", ("sentence1",), ("sentence2",), ()),
    ("text1/text2", ("text1",), ("text2",), ()),
)
_COLUMN_HINT = (
    "Name the columns with --anchor-column/--positive-column/--negative-column "
    "(Python: anchor=..., positive=..., negative=...)."
)


# ---------------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    """A training set bundled under data_root(): a one-line description and how to read it."""

    name: str
    description: str  # one line, shown by `spt-embed train --help` (no '%': argparse formats help strings)
    path: str  # relative to data_root()
    read: Callable[[Path], datasets.Dataset] = field(repr=False)  # raw rows, already named anchor/positive[/negative]

    def load(self, *, limit: int | None = None) -> datasets.Dataset:
        """The preset's rows in the anchor/positive[/negative] schema, cleaned like a user file."""
        path = data_file(self.path)
        raw = self.read(path)
        mapping = {role: role for role in ROLES if role in raw.column_names}
        return _to_schema(raw, f"preset {self.name!r} ({path})", mapping, limit)


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


def _read_sick_pairs(path: Path) -> datasets.Dataset:
    # Header: pair_ID, sentence_A, sentence_B, relatedness_score (1-5), entailment_judgment.
    anchors, positives = [], []
    for number, fields_ in tsv_rows(path, min_fields=4, header=True):
        if parse_score(fields_[3], path, number) >= MIN_PAIR_SCORE:
            anchors.append(fields_[1])
            positives.append(fields_[2])
    return _pairs(anchors, positives)


def _read_sentences(path: Path) -> datasets.Dataset:
    lines = read_lines(path)
    return _pairs(lines, lines)


def _pairs(anchors: list[str], positives: list[str]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})


# Only training-safe splits: STS-B dev selects models; STS-B/SICK/SciFact/Banking77 test sets are for reporting.
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
            "sick-train-pairs",
            "SICK train pairs with relatedness >= 4 of 5, about 1.7k pairs.",
            "sick/SICK_train.txt",
            _read_sick_pairs,
        ),
        Preset(
            "wiki-unsup",
            "11914 Wikipedia sentences as anchor = positive (unsupervised SimCSE); the two views differ only by "
            "dropout, which a frozen backbone lacks, so use it only combined with other data.",
            "wiki1m_prefix/wiki1m_for_simcse.first11914lines.txt",
            _read_sentences,
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
    builder, options = kind
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # the builders raise many types (pandas, pyarrow, DatasetGenerationError)
        raise ValueError(f"{name}: could not be read as {path.suffix.lower()[1:]} ({exc}).") from exc


def _detect_columns(columns: list[str]) -> dict[str, str] | None:
    for _label, anchors, positives, negatives in _ALIASES:
        found = [next((c for c in names if c in columns), None) for names in (anchors, positives, negatives)]
        if found[0] is not None and found[1] is not None:
            return {role: column for role, column in zip(ROLES, found) if column is not None}
    return None


def _resolve_columns(
    columns: list[str], name: str, anchor: str | None, positive: str | None, negative: str | None
) -> dict[str, str]:
    """role -> source column. Named columns win; unnamed anchor/positive are auto-detected. A hard negative is
    only auto-detected when no column is named, so naming anchor and positive never pulls in a third column."""
    explicit = {role: column for role, column in zip(ROLES, (anchor, positive, negative)) if column is not None}
    for role, column in explicit.items():
        if column not in columns:
            raise ValueError(
                f"{name}: no column {column!r} (given for the {role}); available columns: {columns}. {_COLUMN_HINT}"
            )
    detected = _detect_columns(columns)
    if not explicit:
        if detected is not None:
            return detected
        if len(columns) in (2, 3):
            mapping = dict(zip(ROLES, columns))
            logger.info(
                "%s: no recognised column names; using the columns in order: %s",
                name,
                ", ".join(f"{role}={column!r}" for role, column in mapping.items()),
            )
            return mapping
        known = "; ".join(label for label, *_ in _ALIASES)
        raise ValueError(
            f"{name}: cannot tell which columns hold the anchor and positive texts among {columns}. Recognised "
            f"names: {known}; or a file with exactly 2 or 3 columns (taken in order). {_COLUMN_HINT}"
        )
    mapping = {}
    for role in ("anchor", "positive"):
        if role in explicit:
            mapping[role] = explicit[role]
        elif detected is not None:
            mapping[role] = detected[role]
        else:
            raise ValueError(
                f"{name}: no {role} column: none was named and no usual name was found among {columns}. "
                f"{_COLUMN_HINT}"
            )
    if "negative" in explicit:
        mapping["negative"] = explicit["negative"]
    return mapping


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
                f"text column: {_COLUMN_HINT}"
            )
    return pa.chunked_array([pa.array(values, pa.string())])


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")


def _to_schema(dataset: datasets.Dataset, name: str, mapping: dict[str, str], limit: int | None) -> datasets.Dataset:
    """Validate the mapped columns, drop rows with empty text, keep the first `limit` rows, rename to the roles."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    _check_limit(limit)
    # Arrow format honours any indices mapping (a saved shuffled/selected dataset) and reads without copying.
    table = dataset.with_format("arrow")[:]
    columns = {role: _text_column(dataset, table, source, name) for role, source in mapping.items()}
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
    cleaned = pa.table(columns).filter(keep)
    if limit is not None:
        cleaned = cleaned.slice(0, limit)
    return datasets.Dataset.from_dict({role: cleaned.column(role) for role in columns})


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
    name the file's columns; unnamed ones are auto-detected (see _ALIASES, else a 2- or 3-column file in order),
    a negative only when no column is named. Rows with an empty or missing text are dropped (one warning);
    non-text values are an error naming the row (1-based, header not counted) and column. `limit` keeps the first
    rows after cleaning.
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
    mapping = _resolve_columns(list(raw.column_names), name, anchor, positive, negative)
    return _to_schema(raw, name, mapping, limit)
