"""The bundled data folder and the readers of its tab-separated files, shared by training presets and evaluation.

Standard library only: the CLI builds its help from the training presets, which need `data_root` and these
readers, without importing `datasets` or torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

DATA_ENV = "SPT_EMBED_DATA"
STS_SPLITS = ("train", "dev", "test")


def data_root() -> Path:
    """The bundled data folder: $SPT_EMBED_DATA if set, else the repository's ``data/``."""
    env = os.environ.get(DATA_ENV)
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "data"
    if not root.is_dir():
        origin = f"from ${DATA_ENV}" if env else "the repository's data/ folder"
        raise FileNotFoundError(
            f"Data folder {root} ({origin}) does not exist. Set {DATA_ENV} to a folder laid out like the "
            f"repository's data/ (stsb/, sick/, snli_senteval/, senteval_transfer/, wiki1m_prefix/; see "
            f"data/SOURCES.md), or run from a source checkout of spt-embed."
        )
    return root


def data_file(relative: str) -> Path:
    """`relative` under data_root(); an error naming the file and the fix when it is missing."""
    root = data_root()
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{relative} is missing from the data folder {root}. Restore it from the repository (data/SHA256SUMS "
            f"lists every file) or point {DATA_ENV} at a complete copy."
        )
    return path


def read_lines(path: Path, *, encoding: str = "utf-8") -> list[str]:
    """Lines without their terminators. Splits on '\\n' only: str.splitlines() and universal-newline mode would
    also break on characters such as U+2028 or a lone '\\r' that can occur inside a sentence."""
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not {encoding} text ({exc}).") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":  # the piece after the final newline
        lines.pop()
    return lines


def tsv_rows(path: Path, *, min_fields: int, header: bool, encoding: str = "utf-8") -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a tab-separated file, split on tabs only: these files contain unescaped
    quotes that a CSV parser would misread. Blank lines are skipped."""
    lines = read_lines(path, encoding=encoding)
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < min_fields:
            raise ValueError(
                f"{path}:{number}: expected at least {min_fields} tab-separated fields, got {len(fields)}."
            )
        yield number, fields


def read_jsonl_fields(path: Path, keys: tuple[str, ...]) -> list[dict[str, str]]:
    """The `keys` of every object of a JSON-lines file (a BEIR corpus or queries file), in file order; blank lines
    skipped. A line that is not JSON, lacks a key or holds a non-string value is an error naming the file and line."""
    import json

    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: fields {missing} missing (found {sorted(row)}).")
        if not all(isinstance(row[key], str) for key in keys):
            raise ValueError(f"{path}:{number}: fields {list(keys)} must be strings.")
        rows.append({key: row[key] for key in keys})
    return rows


def parse_score(text: str, path: Path, number: int) -> float:
    """A gold score field as a float; an error naming the file and line otherwise."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}:{number}: score {text!r} is not a number.") from None


def read_stsb(path: Path) -> tuple[list[str], list[str], list[float]]:
    """An STS-B file: sentence1s, sentence2s, gold scores 0-5."""
    # No header; fields: genre, source file, year, id, score, sentence1, sentence2 (+ up to 2 trailing fields on
    # some rows, which are ignored).
    s1, s2, scores = [], [], []
    for number, fields in tsv_rows(path, min_fields=7, header=False):
        score = parse_score(fields[4], path, number)
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{path}:{number}: score {score} is outside STS-B's 0-5 range.")
        s1.append(fields[5])
        s2.append(fields[6])
        scores.append(score)
    return s1, s2, scores


def load_sts(split: str = "dev") -> tuple[list[str], list[str], list[float]]:
    """STS-B `split` ("train", "dev" or "test") from data_root()/stsb: sentence1s, sentence2s, gold scores 0-5.

    Dev is for model selection and test for reporting; neither is ever a training preset.
    """
    if split not in STS_SPLITS:
        raise ValueError(f"STS-B split {split!r} does not exist; choose one of {', '.join(STS_SPLITS)}.")
    return read_stsb(data_file(f"stsb/sts-{split}.csv"))


def scifact_documents(limit: int | None = None) -> list[str]:
    """The first `limit` (default: all) BEIR SciFact corpus documents as mteb joins them: title, a space, text."""
    rows = read_jsonl_fields(data_file("beir_scifact/corpus.jsonl"), ("title", "text"))
    return [f"{row['title']} {row['text']}".strip() for row in rows[:limit]]
