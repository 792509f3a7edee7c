"""Streaming corpus readers: BEIR jsonl, csv/tsv, parquet and plain text, one `Document` at a time.

A corpus is never held in memory: files are read line by line (as bytes, so that every record knows its line
number and byte offset, and a bad byte sequence is reported on its own line), parquet files a batch of rows at a
time (only the id, text and title columns). Records are numbered 0, 1, 2, ... in file order (blank lines are not
records); `Shard` slices a corpus by that number, so a shard's documents do not depend on which lines parse. A
reader can start at any document's `Position` and numbers records and lines as a read from the start would.
"""

from __future__ import annotations

import csv
import enum
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spt_embed.recipe import parse_enum

logger = logging.getLogger(__name__)

# Bad lines named one by one in the log before only the count is kept.
MAX_REPORTED_BAD_LINES = 20


class CorpusFormat(str, enum.Enum):
    JSONL = "jsonl"  # one JSON object per line, BEIR layout: _id/id, title, text
    CSV = "csv"  # header row; quoted fields may span lines
    TSV = "tsv"  # header row; split on tabs only, no quoting (BEIR qrels-style files)
    TEXT = "text"  # one document per line; its id is the line number (1-based)
    PARQUET = "parquet"  # one row per document, columns as jsonl fields; "line" and "offset" are the row number


_SUFFIX_FORMATS = {
    ".jsonl": CorpusFormat.JSONL,
    ".csv": CorpusFormat.CSV,
    ".tsv": CorpusFormat.TSV,
    ".parquet": CorpusFormat.PARQUET,
}
# Structured files a stream of lines cannot read: taken as text, every raw line would become a document.
_UNSTREAMED_SUFFIXES = (".json",)
_DEFAULT_ID_FIELDS = ("_id", "id")


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count`: the records whose number r (0-based, file order) has r % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and isinstance(self.index, int) and 0 <= self.index < self.count):
            raise ValueError(f"Shard {self.index}/{self.count} is invalid: i/N needs 0 <= i < N (e.g. 0/4 ... 3/4).")

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise ValueError(f"Shard {text!r} is not of the form i/N (e.g. 0/4 ... 3/4).") from None
        return cls(index, count)

    def __contains__(self, record: int) -> bool:
        return record % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Position:
    """Where a record starts: a reader started here numbers records and lines as a read from the file's start."""

    record: int = 0  # 0-based record number
    line: int = 1  # 1-based line (parquet: row) number
    offset: int = 0  # byte offset of that line (parquet: 0-based row number)


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    record: int  # 0-based record number in the file (what Shard slices on)
    line: int  # 1-based line where the record starts (parquet: row number, 1-based)
    offset: int  # byte offset of that line (parquet: 0-based row): read_document_at() fetches the text from here

    @property
    def position(self) -> Position:
        return Position(self.record, self.line, self.offset)


@dataclass
class CorpusSpec:
    """Where a corpus is and how to read it; stored in index metadata so that search can show snippets."""

    path: str = field(metadata={"help": "Corpus file."})
    format: CorpusFormat | None = field(
        default=None,
        metadata={"help": "jsonl, csv, tsv, parquet or text; None: from the suffix (anything else is text)."},
    )
    id_field: str | None = field(
        default=None, metadata={"help": "Field/column with the document id; None: '_id' then 'id'. Unused for text."}
    )
    text_field: str = field(default="text", metadata={"help": "Field/column with the document text."})
    title_field: str | None = field(
        default="title",
        metadata={"help": "Field/column joined before the text as mteb does for BEIR: (title + ' ' + text).strip()."},
    )
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "Log and skip unreadable records instead of stopping at the first one."}
    )

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if self.format is None:
            suffix = Path(self.path).suffix.lower()
            if suffix in _UNSTREAMED_SUFFIXES:
                raise ValueError(
                    f"{self.path}: a {suffix} file is not read as a corpus (it is not one record per line). Convert "
                    f"it to .jsonl (one JSON object per line), .parquet or .csv/.tsv with a header, or take each "
                    f"line as a "
                    f"document with `spt-embed index --format text` (Python: format='text')."
                )
            self.format = _SUFFIX_FORMATS.get(suffix, CorpusFormat.TEXT)
        self.format = parse_enum(CorpusFormat, self.format, "format")
        if not self.text_field:
            raise ValueError("text_field must name the field holding the document text, got an empty name.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "format": self.format.value}

    def check_file(self) -> Path:
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"Corpus file {file} does not exist.")
        return file


class _BadLines:
    """Stops at the first bad record, or (skip_bad_lines) logs it and counts."""

    def __init__(self, spec: CorpusSpec):
        self.spec, self.count = spec, 0

    def __call__(self, line: int, reason: str) -> None:
        message = f"{self.spec.path}:{line}: {reason}"
        if not self.spec.skip_bad_lines:
            raise ValueError(f"{message} Fix the line, or skip unreadable lines with --skip-bad-lines.")
        self.count += 1
        if self.count <= MAX_REPORTED_BAD_LINES:
            logger.warning("skipped %s", message)

    def summary(self) -> None:
        if self.count:
            logger.warning("%s: skipped %d unreadable record(s) in all.", self.spec.path, self.count)


def _raw_lines(file: Path, start: int = 0, first_line: int = 1) -> Iterator[tuple[int, int, bytes, int]]:
    """(1-based line number, byte offset, bytes without the line ending, offset of the next line).

    Splits on b"\\n" only; the line at byte `start` is number `first_line`."""
    with file.open("rb") as handle:
        handle.seek(start)
        offset = start
        for number, raw in enumerate(handle, start=first_line):
            end = offset + len(raw)
            yield number, offset, raw.rstrip(b"\r\n"), end
            offset = end


def count_records(spec: CorpusSpec) -> int | None:
    """Records in a jsonl or text corpus (non-blank lines) or a parquet one (rows, from its footer): a cheap pass
    for the progress bar. None for csv/tsv."""
    if spec.format is CorpusFormat.PARQUET:
        return _parquet_file(spec.check_file()).metadata.num_rows
    if spec.format not in (CorpusFormat.JSONL, CorpusFormat.TEXT):
        return None
    with spec.check_file().open("rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def iter_documents(spec: CorpusSpec, shard: Shard | None = None, start: Position = Position()) -> Iterator[Document]:
    """The corpus' documents in file order, only those of `shard` if given (others are not even parsed).

    `start`: a document's position (Document.position) to read from there on, numbered as from the file's start.
    Unreadable records (bad UTF-8, bad JSON, a missing id or text, a wrong number of columns) raise ValueError naming
    the file and line, unless `spec.skip_bad_lines`. Duplicate ids are the caller's concern.
    """
    file = spec.check_file()
    shard = shard or Shard()
    bad = _BadLines(spec)
    yield from _documents(file, spec, shard, bad, start)
    bad.summary()


def _documents(file: Path, spec: CorpusSpec, shard: Shard, bad: _BadLines, start: Position) -> Iterator[Document]:
    if spec.format is CorpusFormat.JSONL:
        return _jsonl_documents(file, spec, shard, bad, start)
    if spec.format is CorpusFormat.TEXT:
        return _text_documents(file, shard, bad, start)
    if spec.format is CorpusFormat.PARQUET:
        return _parquet_documents(file, spec, shard, bad, start)
    return _table_documents(file, spec, shard, bad, start)


def read_document_at(spec: CorpusSpec, offset: int) -> Document:
    """The document whose record starts at byte `offset` (parquet: row), as recorded in Document.offset.

    Its record and line numbers count from there (the ids of a text corpus too), so compare only its text."""
    file = spec.check_file()
    bad = _BadLines(CorpusSpec(**{**spec.to_dict(), "skip_bad_lines": False}))
    start = Position(record=0, line=1, offset=offset)
    for document in _documents(file, spec, Shard(), bad, start):
        return document
    raise ValueError(f"{file}: no document at byte offset {offset}; has the corpus changed since it was indexed?")


def _decode(raw: bytes, line: int, bad: _BadLines) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad(line, f"not UTF-8 text ({exc.reason} at byte {exc.start}).")
        return None


def _shard_lines(file: Path, shard: Shard, bad: _BadLines, start: Position) -> Iterator[tuple[int, int, int, str]]:
    """(line, byte offset, record number, text) of this shard's non-blank, UTF-8 lines; blank lines are no records
    (ids and shards ignore them) and are reported once at the end."""
    record = start.record - 1
    blank: list[int] = []
    for line, offset, raw, _ in _raw_lines(file, start.offset, start.line):
        if not raw.strip():
            blank.append(line)
            continue
        record += 1
        if record not in shard:
            continue
        text = _decode(raw, line, bad)
        if text is not None:
            yield line, offset, record, text
    _report_blank(file, blank)


def _text_documents(file: Path, shard: Shard, bad: _BadLines, start: Position) -> Iterator[Document]:
    for line, offset, record, text in _shard_lines(file, shard, bad, start):
        yield Document(str(line), text.strip(), record, line, offset)  # the id: the line number in the whole file


def _jsonl_documents(file: Path, spec: CorpusSpec, shard: Shard, bad: _BadLines, start: Position) -> Iterator[Document]:
    for line, offset, record, text in _shard_lines(file, shard, bad, start):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            bad(line, f"not valid JSON ({exc.msg}, column {exc.colno}).")
            continue
        if not isinstance(row, dict):
            bad(line, f"expected a JSON object, got {type(row).__name__}.")
            continue
        document = _document_from_row(row, spec, record, line, offset, bad, list(row))
        if document is not None:
            yield document


def _report_blank(file: Path, blank: list[int]) -> None:
    """Blank lines are no records (ids and shards ignore them) but may be a sign of a broken file."""
    if blank:
        more = ", ..." if len(blank) > MAX_REPORTED_BAD_LINES else ""
        shown = ", ".join(map(str, blank[:MAX_REPORTED_BAD_LINES])) + more
        logger.warning("%s: skipped %d blank line(s): %s", file, len(blank), shown)

def _document_from_row(
    row: dict[str, Any], spec: CorpusSpec, record: int, line: int, offset: int, bad: _BadLines, fields: list[str]
) -> Document | None:
    id_fields = (spec.id_field,) if spec.id_field else _DEFAULT_ID_FIELDS
    id_field = next((name for name in id_fields if name in row), None)
    if id_field is None:
        bad(line, f"no id field ({' or '.join(map(repr, id_fields))}) among {fields}; name it with --id-field.")
        return None
    doc_id = row[id_field]
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        bad(line, f"id {doc_id!r} in {id_field!r} is not a non-empty string.")
        return None
    if spec.text_field not in row:
        bad(line, f"no {spec.text_field!r} field among {fields}; name it with --text-field.")
        return None
    text, title = row[spec.text_field], row.get(spec.title_field) if spec.title_field else None
    if text is None:
        text = ""
    if not isinstance(text, str) or not (title is None or isinstance(title, str)):
        bad(line, f"text and title must be strings, got {type(text).__name__} and {type(title).__name__}.")
        return None
    # mteb's BEIR convention: "title text", stripped; the text alone when there is no title.
    joined = f"{title} {text}".strip() if title else text.strip()
    return Document(doc_id, joined, record, line, offset)


class _LineSource:
    """Decoded lines for csv.reader, remembering where the next line starts (the start of the next record)."""

    def __init__(self, file: Path, bad: _BadLines, start: int, first_line: int = 1):
        self._lines = _raw_lines(file, start, first_line)
        self._bad = bad
        self.next_line, self.next_offset = first_line, start

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        line, _, raw, end = next(self._lines)
        self.next_line, self.next_offset = line + 1, end
        text = _decode(raw, line, self._bad)
        return "\n" if text is None else text + "\n"


def _id_column(file: Path, spec: CorpusSpec, columns: list[str]) -> str:
    """The id column of a table corpus (csv / tsv / parquet) with these `columns`, once it and the text column are
    known to be there; if one is missing, an error names it and the flags that name the columns."""
    id_names = (spec.id_field,) if spec.id_field else _DEFAULT_ID_FIELDS
    id_column = next((name for name in id_names if name in columns), None)
    if id_column is None or spec.text_field not in columns:
        missing = repr(spec.text_field) if id_column is not None else " or ".join(map(repr, id_names))
        raise ValueError(
            f"{file}: no column {missing} among {columns}; name the columns with --id-field / --text-field."
        )
    return id_column


def _table_documents(file: Path, spec: CorpusSpec, shard: Shard, bad: _BadLines, start: Position) -> Iterator[Document]:
    tsv = spec.format is CorpusFormat.TSV
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"strict": True}
    header_source = _LineSource(file, bad, 0)
    header = next(csv.reader(header_source, **options), None)
    if not header:
        raise ValueError(f"{file}: no header row; a {spec.format.value} corpus needs one naming its columns.")
    id_column = _id_column(file, spec, header)
    # A record read from `start` is a data row; from 0 the header comes first.
    source = header_source if start.offset == 0 else _LineSource(file, bad, start.offset, start.line)
    reader = csv.reader(source, **options)
    record = start.record - 1
    while True:
        # csv.reader reads no further than one record, so the next line the source hands out starts this record.
        line, offset = source.next_line, source.next_offset
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            record += 1
            if record in shard:
                bad(line, f"not valid {spec.format.value} ({exc}).")
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        record += 1
        if record not in shard:
            continue
        if len(row) != len(header):
            bad(line, f"{len(row)} columns, the header has {len(header)}.")
            continue
        document = _document_from_row(dict(zip(header, row)), spec, record, line, offset, bad, header)
        if document is not None:
            yield document



def _parquet_file(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for a file that is not parquet
        raise ValueError(f"{file}: not a readable parquet file ({exc}).") from None


def _parquet_documents(
    file: Path, spec: CorpusSpec, shard: Shard, bad: _BadLines, start: Position, batch_rows: int = 1024
) -> Iterator[Document]:
    """Rows as jsonl records (the same id/text/title rules); reads only those columns, from the row group holding
    `start.offset` on. A row's "line" is its 1-based row number, its offset the 0-based one."""
    parquet = _parquet_file(file)
    columns = parquet.schema_arrow.names
    id_column = _id_column(file, spec, columns)
    wanted = [id_column, spec.text_field] + ([spec.title_field] if spec.title_field in columns else [])
    groups, row = [], 0  # the row groups from the one holding start.offset on; `row`: the first row they hold
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if row + size > start.offset or groups:
            groups.append(group)
        else:
            row += size
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=wanted):
        for values in batch.to_pylist():
            row, record = row + 1, row  # a parquet file has no blank rows: record = 0-based row, line = 1-based
            if record < start.offset or record not in shard:
                continue
            document = _document_from_row(values, spec, record, row, record, bad, columns)
            if document is not None:
                yield document
