"""Reading texts to encode: one per line, or jsonl records with a text field."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def read_texts(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """Texts from a .jsonl file (field `text_field`) or a plain file (one text per line, every line kept).

    Rows keep their order and count, so row i of the output embeddings is line i of the input; empty texts are
    kept (and counted in the log) because dropping them would shift every later row.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Input file {file} does not exist.")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc}); convert it to UTF-8 first.") from None
    if file.suffix.lower() == ".jsonl":
        texts = [_jsonl_text(line, number, file, text_field) for number, line in enumerate(lines, start=1) if line.strip()]
    else:
        texts = lines
    if not texts:
        raise ValueError(f"{file} contains no texts.")
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        logger.warning("%s: %d of %d texts are empty; each gets the soft prompt's own embedding.", file, empty, len(texts))
    return texts


def _jsonl_text(line: str, number: int, file: Path, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}:{number}: not valid JSON ({exc.msg}).") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{file}:{number}: no {field!r} field; choose the field with --text-field.")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{file}:{number}: field {field!r} is {type(value).__name__}, expected a string.")
    return value
