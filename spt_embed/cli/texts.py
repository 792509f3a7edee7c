"""Reading texts to encode, one output row per input text: plain text (one per line), jsonl, a JSON array, or a
csv/tsv table with a header row. The format comes from the file's suffix; any other suffix is refused rather than
read line by line (a .json or .parquet file read as lines would give one "text" per raw line)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

PLAIN_SUFFIXES = ("", ".txt", ".text")
SUPPORTED = (
    ".txt or no suffix (one text per line), .jsonl (one JSON object per line), .json (an array of strings or of "
    "objects), .csv or .tsv (a header row naming the columns)"
)


def read_texts(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """Texts from `path`, in file order. Records (.jsonl lines, .json array elements, csv/tsv rows) give their
    field/column `text_field`; a JSON string element or line is a text itself. Plain text keeps every line.

    Rows keep their order and count, so row i of the output embeddings is record i of the input; empty texts are
    kept (and counted in the log) because dropping them would shift every later row.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Input file {file} does not exist.")
    suffix = file.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise ValueError(f"{file}: cannot read {suffix} files. Supported inputs: {SUPPORTED}.")
    try:
        content = file.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark (Excel's csv) is not text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc}); convert it to UTF-8 first.") from None
    texts = reader(content, file, text_field)
    if not texts:
        raise ValueError(f"{file} contains no texts.")
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        logger.warning("%s: %d of %d texts are empty; each gets the prompt's own embedding.", file, empty, len(texts))
    return texts


def _lines(content: str) -> list[str]:
    """Lines split on '\\n' only (str.splitlines() would also split inside a text at U+2028 or a lone '\\r')."""
    lines = [line.removesuffix("\r") for line in content.split("\n")]
    if lines and lines[-1] == "":  # the piece after the final newline
        lines.pop()
    return lines


def _plain(content: str, file: Path, field: str) -> list[str]:
    return _lines(content)


def _jsonl(content: str, file: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_lines(content), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}:{number}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
        texts.append(_record_text(record, field, f"{file}:{number}:"))
    return texts


def _json(content: str, file: Path, field: str) -> list[str]:
    try:
        records = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{file}: expected a JSON array of strings or of objects with a {field!r} field, got a "
            f"{type(records).__name__}. (One JSON object per line is a .jsonl file.)"
        )
    return [_record_text(record, field, f"{file}: element {i}:") for i, record in enumerate(records)]


def _record_text(record: object, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or field not in record:
        found = f"fields {list(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        raise ValueError(f"{where} no {field!r} field (found {found}); choose the field with --text-field.")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where} field {field!r} is {type(value).__name__}, expected a string.")
    return value


def _table(content: str, file: Path, field: str, *, tsv: bool) -> list[str]:
    # TSV is split on tabs only, no quoting (as the corpus reader does); csv follows RFC 4180 quoting.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"strict": True}
    reader = csv.reader(io.StringIO(content, newline=""), **options)
    try:
        header = next(reader, None)
        if not header:
            raise ValueError(f"{file}: no header row; the first row must name the columns.")
        if field not in header:
            raise ValueError(f"{file}: no column {field!r} among {header}; choose the column with --text-field.")
        column, texts = header.index(field), []
        for row in reader:
            if not row:  # a blank line is no record
                continue
            if len(row) != len(header):
                raise ValueError(f"{file}:{reader.line_num}: {len(row)} columns, the header has {len(header)}.")
            texts.append(row[column])
    except csv.Error as exc:
        raise ValueError(f"{file}:{reader.line_num}: not valid {'tsv' if tsv else 'csv'} ({exc}).") from None
    return texts


_READERS: dict[str, Callable[[str, Path, str], list[str]]] = {
    **{suffix: _plain for suffix in PLAIN_SUFFIXES},
    ".jsonl": _jsonl,
    ".json": _json,
    ".csv": lambda content, file, field: _table(content, file, field, tsv=False),
    ".tsv": lambda content, file, field: _table(content, file, field, tsv=True),
}
