"""Mined hard negatives (issue 17): a `negative` column for the retrieval sources named in `mine_negatives`.

sentence-transformers' `mine_hard_negatives` does the mining, with the encoder as the run starts (the untrained soft
prompts on the frozen backbone, or the baseline before its first step): it ranks the source's own training passages
(its positive column, after `split_retrieval_dev` held out the retrieval dev rows, so that no held-out row is a
candidate and no test corpus is ever read) for each query, encoding queries with `encode_query` and passages with
`encode_document`, the routes that training's `router_mapping` gives a retrieval source's anchor and
positive/negative columns (the `query` and `document` soft prompts and the document length where the model has them,
the default prompt otherwise). Each row gets one negative ("top" sampling, so no randomness): the best-ranked passage
within the top `mine_range_max` that is not one of its query's positives, scores at least `mine_relative_margin` of
the positive's score below it (and at most `mine_max_score`), after skipping `mine_range_min` such passages. A row
for which none passes gets a seeded random other passage of the same training corpus, so that the source keeps every
row; the counts are logged and recorded.

The mined rows are saved in the run's folder (mined/<dataset name>.parquet, beside <dataset name>.json with the
settings, counts and seconds) once the run has started, and `--resume` reuses them when the settings and the
source's training rows are unchanged, so a resumed run trains on exactly the negatives it started with.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt_embed.atomic import atomic_file, write_json
from spt_embed.recipe import is_main_process

if TYPE_CHECKING:
    import datasets

    from spt_embed.training.train_config import TrainConfig

logger = logging.getLogger(__name__)

MINED = "mined"  # the run folder's entry with the mined rows of each source
COLUMNS = ["anchor", "positive", "negative"]
ENCODE_BATCH = 32  # mine_hard_negatives' default encoding batch
SCORE_CHUNK = 1024  # queries per similarity chunk: bounds the (chunk x corpus) score matrix in memory


@dataclass
class MinedSource:
    """One source's rows with their negative, and what `record` says about them (settings, counts, seconds)."""

    name: str  # the source's dataset name (train.source_names)
    rows: datasets.Dataset
    record: dict[str, Any]
    reused: bool  # read from the run's mined/ folder rather than mined now

    def summary(self) -> dict[str, Any]:
        keys = ("source", "rows", "mined", "random", "seconds")
        return {**{key: self.record[key] for key in keys}, "reused": self.reused}


def mining_settings(config: TrainConfig, source: str) -> dict[str, Any]:
    """What the mined negatives of `source` depend on besides its training rows and the starting encoder (which
    --resume keeps: see train.FIXED_ON_RESUME)."""
    return {
        "source": source,
        "range_min": config.mine_range_min,
        "range_max": config.mine_range_max,
        "relative_margin": config.mine_relative_margin,
        "max_score": config.mine_max_score,
        "num_negatives": 1,
        "sampling_strategy": "top",
        "seed": config.seed,
    }


def mine_negatives(dataset, model, config: TrainConfig, output: Path, *, reuse: bool):
    """(training data with a mined `negative` column on each source of `config.mine_negatives`, {dataset name:
    MinedSource}). `dataset`: the training data after `split_retrieval_dev`, before `oversample`; `model`: the
    encoder as training starts; `reuse`: read the run's earlier mined rows from `output`/mined when they match
    (a resume). Nothing is written here: `save_mined` does that once the run folder is started."""
    if not config.mine_negatives:
        return dataset, {}
    from spt_embed.training.train import _check_one_batch, by_source, source_names

    names = {source: name for name, source in source_names(config.data).items()}
    parts, single = by_source(dataset, config)
    check_minable(dataset, config)
    mined: dict[str, MinedSource] = {}
    for source in config.mine_negatives:
        name = names[source]
        part = parts[name]
        settings = mining_settings(config, source)
        cached = _read_cached(output / MINED, name, part, settings) if reuse else None
        if cached is not None:
            rows, record = cached
            logger.info(
                "Mined negatives of %s reused from %s: %d of %d rows mined (%d random), mined in %.1f s at the start "
                "of this run", source, output / MINED / f"{name}.parquet", record["mined"], record["rows"],
                record["random"], record["seconds"],
            )
            item = MinedSource(name, rows, record, reused=True)
        else:
            item = _mine(part, model, config, name, settings)
        _check_one_batch(item.rows, source, config)
        parts[name] = item.rows
        mined[name] = item
    return (next(iter(parts.values())) if single else parts), mined


def check_minable(dataset, config: TrainConfig) -> None:
    """Each source of `config.mine_negatives` is an (anchor, positive) pair source: no negative column of its own
    (squad-qa has one) and no `score` column. Checked on the loaded data, before the encoder is built."""
    from spt_embed.training.data import PRESETS, SCORE
    from spt_embed.training.train import by_source, source_names

    names = {source: name for name, source in source_names(config.data).items()}
    parts, _ = by_source(dataset, config)
    for source in config.mine_negatives:
        columns = parts[names[source]].column_names
        if "negative" in columns:
            own = (
                f" (preset {source!r} has its own hard negatives: {PRESETS[source].description})"
                if source in PRESETS
                else ""
            )
            raise ValueError(
                f"mine_negatives {source!r}: the source already has a negative column{own}. Mining adds one to "
                f"(anchor, positive) pairs only; drop {source!r} from mine_negatives."
            )
        if SCORE in columns:
            raise ValueError(
                f"mine_negatives {source!r}: a graded source (with a {SCORE!r} column) is trained with the graded "
                f"loss, which reads no negative; mining is for (query, passage) pairs."
            )


def _mine(part, model, config: TrainConfig, name: str, settings: dict[str, Any]) -> MinedSource:
    """One source's rows, in their order, each with one negative: mine_hard_negatives' where it found one, else a
    seeded random other passage of the source's training passages."""
    import datasets
    from sentence_transformers.util import mine_hard_negatives

    source = settings["source"]
    anchors, positives = list(part["anchor"]), list(part["positive"])
    corpus = list(dict.fromkeys(positives))
    logger.info(
        "Mining hard negatives for %s: %d queries against its %d training passages (encode_query / encode_document "
        "with the encoder as training starts)", source, len(anchors), len(corpus),
    )
    start = time.perf_counter()
    triplets = mine_hard_negatives(
        part,
        model,
        anchor_column_name="anchor",
        positive_column_name="positive",
        corpus=None,  # the candidates are the source's own training passages (its positive column), nothing else
        range_min=config.mine_range_min,
        range_max=config.mine_range_max,
        max_score=config.mine_max_score,
        relative_margin=config.mine_relative_margin,
        num_negatives=1,
        sampling_strategy="top",
        output_format="triplet",
        batch_size=ENCODE_BATCH,
        faiss_batch_size=SCORE_CHUNK,
        verbose=is_main_process(),
    )
    seconds = time.perf_counter() - start
    found: dict[tuple[str, str], str] = {}
    for anchor, positive, negative in zip(triplets["anchor"], triplets["positive"], triplets["negative"]):
        found.setdefault((anchor, positive), negative)
    # mine_hard_negatives takes every positive of a repeated query as that query's: none of them is its negative.
    own: dict[str, set[str]] = {}
    for anchor, positive in zip(anchors, positives):
        own.setdefault(anchor, set()).add(positive)
    generator = random.Random(f"{config.seed}:{source}")  # a str seed is hashed the same in every process
    negatives, fallbacks = [], 0
    for anchor, positive in zip(anchors, positives):
        negative = found.get((anchor, positive))
        if negative is None:
            negative = _random_passage(generator, corpus, own[anchor] | {anchor}, source)
            fallbacks += 1
        negatives.append(negative)
    rows = datasets.Dataset.from_dict({"anchor": anchors, "positive": positives, "negative": negatives})
    record = {
        "source": source,
        "settings": settings,
        "rows": len(rows),
        "mined": len(rows) - fallbacks,
        "random": fallbacks,
        "corpus": len(corpus),
        "seconds": round(seconds, 1),
    }
    logger.info(
        "Mined hard negatives for %s in %.1f s: %d of %d rows got a mined negative, %d a random other passage (no "
        "passage in the top %d passed the guards)", source, seconds, record["mined"], len(rows), fallbacks,
        config.mine_range_max,
    )
    if fallbacks > len(rows) // 2:
        logger.warning(
            "%s: %d of %d rows found no mined negative; a larger mine_range_max (or a smaller mine_relative_margin) "
            "finds more.", source, fallbacks, len(rows),
        )
    return MinedSource(name, rows, record, reused=False)


def _random_passage(generator: random.Random, corpus: list[str], exclude: set[str], source: str) -> str:
    for _ in range(64):
        passage = corpus[generator.randrange(len(corpus))]
        if passage not in exclude:
            return passage
    others = [passage for passage in corpus if passage not in exclude]
    if not others:
        raise ValueError(f"mine_negatives {source!r}: no training passage other than a query's own to use as negative.")
    return others[generator.randrange(len(others))]


def _read_cached(folder: Path, name: str, part, settings: dict[str, Any]):
    """(rows, record) of `name` saved in `folder` by this run's start, or None (with the reason logged) when there
    are none, they are unreadable, or were mined with other settings or from other training rows."""
    import datasets
    import pyarrow.parquet as pq

    table_path, record_path = folder / f"{name}.parquet", folder / f"{name}.json"
    if not record_path.is_file() or not table_path.is_file():
        logger.info("--resume: no mined negatives of %s saved in %s; mining them again.", settings["source"], folder)
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        table = pq.read_table(table_path)
    except (OSError, ValueError) as exc:
        logger.warning("--resume: the mined negatives in %s are unreadable (%s); mining them again.", folder, exc)
        return None
    why = None
    if not isinstance(record, dict) or record.get("settings") != settings:
        why = f"they were mined with {record.get('settings') if isinstance(record, dict) else None}, not {settings}"
    elif table.column_names != COLUMNS or table.num_rows != len(part):
        why = f"they hold {table.num_rows} rows with columns {table.column_names}, the source {len(part)} rows"
    elif table.column("anchor").to_pylist() != list(part["anchor"]) or table.column(
        "positive"
    ).to_pylist() != list(part["positive"]):
        why = "the source's training rows differ from those they were mined for"
    if why:
        logger.warning("--resume: not reusing the mined negatives of %s in %s: %s; mining them again.",
                       settings["source"], folder, why)
        return None
    return datasets.Dataset.from_dict({column: table.column(column) for column in COLUMNS}), record


def save_mined(output: Path, mined: dict[str, MinedSource]) -> None:
    """Write each newly mined source into `output`/mined (the rows, then the record that marks them complete)."""
    import pyarrow.parquet as pq

    for name, item in mined.items():
        if item.reused:
            continue
        folder = Path(output) / MINED
        with atomic_file(folder / f"{name}.parquet", "wb") as handle:
            pq.write_table(item.rows.with_format("arrow")[:], handle)
        write_json(folder / f"{name}.json", item.record)
