"""Which columns of a user's training file hold the anchor, positive and negative texts.

Columns are found by known names only (anchor/positive/negative, SimCSE's sent0/sent1/hard_neg, ...) or named by
the user. Column order is never trusted beyond one case, a file of exactly two columns with no known names: a
premise/hypothesis/label NLI file taken in order would train on the label word as the hard negative. Any column
chosen by position or by a flag is also checked for holding class labels rather than sentences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

ROLES = ("anchor", "positive", "negative")

# Column names recognised without --*-column flags, tried in order: (label, anchor, positive, negative) names.
ALIASES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("anchor/positive[/negative]", ("anchor",), ("positive",), ("negative",)),
    ("sent0/sent1[/hard_neg] (SimCSE)", ("sent0",), ("sent1",), ("hard_neg",)),
    ("query/positive|pos[/negative|neg]", ("query",), ("positive", "pos"), ("negative", "neg")),
    ("sentence1/sentence2", ("sentence1",), ("sentence2",), ()),
    ("text1/text2", ("text1",), ("text2",), ()),
)
COLUMN_HINT = (
    "Name the columns with --anchor-column/--positive-column/--negative-column "
    "(Python: anchor=..., positive=..., negative=...)."
)

# A column is taken for class labels when it has at most MAX_LABELS distinct values, each of at most
# MAX_LABEL_WORDS words and MAX_LABEL_CHARS characters, repeated on average at least MIN_LABEL_REPEATS times
# (with fewer rows a small set of short sentences cannot be told from labels, and is let through).
MAX_LABELS, MAX_LABEL_WORDS, MAX_LABEL_CHARS, MIN_LABEL_REPEATS = 10, 3, 32, 4


def _detect(columns: list[str]) -> dict[str, str] | None:
    for _label, anchors, positives, negatives in ALIASES:
        found = [next((c for c in names if c in columns), None) for names in (anchors, positives, negatives)]
        if found[0] is not None and found[1] is not None:
            return {role: column for role, column in zip(ROLES, found) if column is not None}
    return None


def resolve_columns(
    columns: list[str], name: str, anchor: str | None, positive: str | None, negative: str | None
) -> tuple[dict[str, str], bool]:
    """(role -> source column, whether the columns were taken by position). Named columns win; unnamed
    anchor/positive are found by their known names. A hard negative is only auto-detected when no column is named,
    so naming anchor and positive never pulls in a third column."""
    explicit = {role: column for role, column in zip(ROLES, (anchor, positive, negative)) if column is not None}
    for role, column in explicit.items():
        if column not in columns:
            raise ValueError(
                f"{name}: no column {column!r} (given for the {role}); available columns: {columns}. {COLUMN_HINT}"
            )
    detected = _detect(columns)
    if not explicit:
        if detected is not None:
            return detected, False
        if len(columns) == 2:
            return dict(zip(ROLES, columns)), True
        known = "; ".join(label for label, *_ in ALIASES)
        raise ValueError(
            f"{name}: cannot tell which columns hold the anchor and positive texts among {columns} (the order of "
            f"columns is not used beyond a file of exactly two). Recognised names: {known}. {COLUMN_HINT}"
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
                f"{COLUMN_HINT}"
            )
    if "negative" in explicit:
        mapping["negative"] = explicit["negative"]
    return mapping, False


def label_values(column: pa.ChunkedArray) -> list[str] | None:
    """The distinct values of a string column that holds a handful of short class labels ("entailment",
    "contradiction", ...) rather than sentences; None for a text column."""
    import pyarrow.compute as pc

    present = pc.drop_null(column)
    if pc.count_distinct(present).as_py() > MAX_LABELS:
        return None
    values = sorted(pc.unique(present).to_pylist())
    if not values or len(present) < MIN_LABEL_REPEATS * len(values):
        return None
    if all(len(value) <= MAX_LABEL_CHARS and len(value.split()) <= MAX_LABEL_WORDS for value in values):
        return values
    return None


def refuse_labels(column: pa.ChunkedArray, name: str, role: str, source: str, how: str, columns: list[str]) -> None:
    """ValueError when `column` (the `role`, chosen `how`) holds class labels, naming the columns found."""
    values = label_values(column)
    if values is not None:
        shown = ", ".join(repr(value) for value in values)
        raise ValueError(
            f"{name}: column {source!r} ({how} for the {role}) holds only {len(values)} distinct short values "
            f"({shown}) in {len(column)} rows: class labels, not text to embed. Columns found: {columns}. "
            f"{COLUMN_HINT} (Labelled pairs such as NLI are first turned into anchor/positive[/negative] rows.)"
        )
