"""Offline MTEB tasks over the bundled data: mteb's own task classes, fed from data_root() instead of a hub.

Each local task subclasses mteb's built-in task of the same name, so the evaluation protocol (evaluator, main
score, score range, classifier, number of experiments, k values) is exactly mteb's and the numbers compare with the
MTEB leaderboard. Only the data source changes: ``load_data`` reads files under ``data_root()`` and the task's
``dataset`` metadata names that folder and a content hash of the files read.

| task                    | type           | split(s)                            | main score      | files         |
|-------------------------|----------------|-------------------------------------|-----------------|---------------|
| STSBenchmark            | STS            | test (validation, train on request) | cosine_spearman | stsb/         |
| SICK-R                  | STS            | test = all 9,927 pairs (as mteb)    | cosine_spearman | sick/         |
| SciFact                 | Retrieval      | test (300 queries, 5,183 docs)      | ndcg_at_10      | beir_scifact/ |
| Banking77Classification | Classification | test; train feeds the classifier    | accuracy        | banking77/    |

Adding a local task for a new dataset: subclass an mteb task class, give it a ``TaskMetadata`` (or copy a
built-in's with ``_local_metadata``) and a ``load_data`` that sets ``self.dataset`` in the layout the task type
expects, then decorate it with ``@register_local_task``::

    @register_local_task
    class MySTS(AbsTaskSTS):
        metadata = TaskMetadata(name="MySTS", description="...", type="STS", eval_langs=["eng-Latn"],
                                main_score="cosine_spearman", eval_splits=["test"],
                                dataset={"path": "data/my_sts", "revision": "local"})

        def load_data(self, num_proc=None, **kwargs):
            if self.data_loaded:
                return
            rows = ...  # read data_root() / "my_sts" / "test.tsv"
            self.dataset = {"test": Dataset.from_dict({"sentence1": ..., "sentence2": ..., "score": ...})}
            self.data_loaded = True

Layouts: STS ``{split: Dataset(sentence1, sentence2, score)}``; classification ``{split: Dataset(text, label)}``
including the classifier's ``train`` split; retrieval ``{"default": {split: {"corpus": Dataset(id, title,
text), "queries": Dataset(id, text), "relevant_docs": {query_id: {doc_id: int}}, "top_ranked": None}}}``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mteb
from datasets import Dataset

from spt_embed.datafiles import data_file, read_jsonl_fields, read_stsb, tsv_rows

logger = logging.getLogger(__name__)

LOCAL_TASKS: dict[str, type[mteb.AbsTask]] = {}


def register_local_task(cls: type[mteb.AbsTask]) -> type[mteb.AbsTask]:
    """Class decorator: make `cls` resolvable by its metadata name in `get_tasks` (it wins over a built-in)."""
    LOCAL_TASKS[cls.metadata.name] = cls
    return cls


def _builtin(name: str) -> type[mteb.AbsTask]:
    """mteb's own class for task `name` (instantiating it reads no data)."""
    return type(mteb.get_task(name))


def _local_metadata(name: str, folder: str) -> mteb.TaskMetadata:
    """The built-in task's metadata with the data source pointed at `data_root()/folder`."""
    metadata = mteb.get_task(name).metadata
    return metadata.model_copy(
        update={
            "dataset": {"path": f"data/{folder}", "revision": "local"},
            "description": f"{metadata.description} Local copy read from spt-embed's data/{folder}.",
            # The superseding version's data is not bundled; pointing at it would only add a warning.
            "superseded_by": None,
        }
    )


class _LocalTask:
    """Mixin: record which files were read (their content hash becomes the dataset revision in the results)."""

    metadata: mteb.TaskMetadata
    available_splits: tuple[str, ...] = ("test",)

    def _read(self, relative: str) -> Path:
        path = data_file(relative)
        self._digest.update(relative.encode())
        self._digest.update(hashlib.sha256(path.read_bytes()).digest())
        return path

    def _start_reading(self) -> None:
        self._digest = hashlib.sha256()

    def _finish_reading(self) -> None:
        dataset = {**self.metadata.dataset, "revision": f"local-{self._digest.hexdigest()[:12]}"}
        self.metadata = self.metadata.model_copy(update={"dataset": dataset})
        self.data_loaded = True


@register_local_task
class STSBenchmark(_LocalTask, _builtin("STSBenchmark")):
    """STS-B (Cer et al. 2017): test for reporting; `validation` (the dev set) for model selection."""

    metadata = _local_metadata("STSBenchmark", "stsb")
    available_splits = ("train", "validation", "test")

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        files = {"train": "train", "validation": "dev", "test": "test"}
        self.dataset = {}
        for split in self.eval_splits:
            s1, s2, scores = read_stsb(self._read(f"stsb/sts-{files[split]}.csv"))
            self.dataset[split] = Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": scores})
        self._finish_reading()


@register_local_task
class SICKR(_LocalTask, _builtin("SICK-R")):
    """SICK relatedness (Marelli et al. 2014). mteb's SICK-R "test" split is the whole release (train + trial +
    test, 9,927 pairs), so it is here too: scores then compare with the MTEB leaderboard."""

    metadata = _local_metadata("SICK-R", "sick")
    FILES = ("sick/SICK_train.txt", "sick/SICK_trial.txt", "sick/SICK_test_annotated.txt")

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        s1, s2, scores = [], [], []
        for relative in self.FILES:
            path = self._read(relative)
            # Header: pair_ID, sentence_A, sentence_B, relatedness_score (1-5), entailment_judgment.
            for number, fields in tsv_rows(path, min_fields=4, header=True):
                try:
                    scores.append(float(fields[3]))
                except ValueError:
                    raise ValueError(f"{path}:{number}: relatedness score {fields[3]!r} is not a number.") from None
                s1.append(fields[1])
                s2.append(fields[2])
        self.dataset = {"test": Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": scores})}
        self._finish_reading()


@register_local_task
class SciFact(_LocalTask, _builtin("SciFact")):
    """BEIR SciFact: the full corpus, the queries that have test qrels, and the test qrels."""

    metadata = _local_metadata("SciFact", "beir_scifact")

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        corpus = read_jsonl_fields(self._read("beir_scifact/corpus.jsonl"), ("_id", "title", "text"))
        queries = read_jsonl_fields(self._read("beir_scifact/queries.jsonl"), ("_id", "text"))
        self.dataset = {"default": {}}
        for split in self.eval_splits:
            qrels = _read_qrels(self._read(f"beir_scifact/qrels/{split}.tsv"))
            unknown = sorted(set(qrels) - {row["_id"] for row in queries})
            if unknown:
                raise ValueError(
                    f"beir_scifact/qrels/{split}.tsv names queries missing from queries.jsonl: {unknown[:5]}"
                )
            kept = [row for row in queries if row["_id"] in qrels]
            self.dataset["default"][split] = {
                "corpus": Dataset.from_dict(
                    {"id": [r["_id"] for r in corpus], "title": [r["title"] for r in corpus], "text": _texts(corpus)}
                ),
                "queries": Dataset.from_dict({"id": [r["_id"] for r in kept], "text": [r["text"] for r in kept]}),
                "relevant_docs": qrels,
                "top_ranked": None,
            }
        self._finish_reading()


@register_local_task
class Banking77Classification(_LocalTask, _builtin("Banking77Classification")):
    """Banking77 (Casanueva et al. 2020): mteb's protocol, a logistic regression on 8 training examples per label
    drawn from `train`, 10 experiments averaged, accuracy on `test`."""

    metadata = _local_metadata("Banking77Classification", "banking77")

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        splits = {split: _read_text_category(self._read(f"banking77/{split}.csv")) for split in ("train", "test")}
        names = sorted({category for _, categories in splits.values() for category in categories})
        label = {name: index for index, name in enumerate(names)}
        self.dataset = {
            split: Dataset.from_dict({"text": texts, "label": [label[c] for c in categories]})
            for split, (texts, categories) in splits.items()
        }
        self._finish_reading()


# ---------------------------------------------------------------------------------------------------------------
# Readers


def _texts(rows: list[dict[str, str]]) -> list[str]:
    return [row["text"] for row in rows]


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    # Header: query-id, corpus-id, score.
    qrels: dict[str, dict[str, int]] = {}
    for number, fields in tsv_rows(path, min_fields=3, header=True):
        try:
            score = int(fields[2])
        except ValueError:
            raise ValueError(f"{path}:{number}: relevance {fields[2]!r} is not an integer.") from None
        qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels


def _read_text_category(path: Path) -> tuple[list[str], list[str]]:
    # CSV with header text,category; quoted fields may contain commas.
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: expected a header with columns text,category, found {reader.fieldnames}.")
    texts, categories = [], []
    for row in reader:
        texts.append(row["text"])
        categories.append(row["category"])
    return texts, categories


# ---------------------------------------------------------------------------------------------------------------
# Task lookup


def get_tasks(names: Sequence[str], *, eval_splits: Sequence[str] | None = None) -> list[mteb.AbsTask]:
    """Task objects for `names`: a local task when one has that name, else mteb's built-in (needs its hub).

    `eval_splits` replaces the splits evaluated (e.g. ``["validation"]`` for STS-B dev); each local task checks
    that it has them.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError(f"No tasks given; local tasks (offline): {', '.join(LOCAL_TASKS)}.")
    tasks = []
    for name in names:
        if name in LOCAL_TASKS:
            task = LOCAL_TASKS[name]()
            if eval_splits:
                missing = [split for split in eval_splits if split not in task.available_splits]
                if missing:
                    raise ValueError(
                        f"Task {name!r} has no split(s) {missing}; it has {', '.join(task.available_splits)}."
                    )
        else:
            try:
                task = mteb.get_task(name)
            except KeyError as exc:
                raise ValueError(
                    f"Unknown task {name!r}. Local tasks (bundled data, offline): {', '.join(LOCAL_TASKS)}; any other "
                    f"name must be an mteb task (mteb.get_tasks() lists them). mteb says: {exc.args[0]}"
                ) from None
        if eval_splits:
            task.filter_eval_splits(list(eval_splits))
        tasks.append(task)
    return tasks


def load_task_data(task: mteb.AbsTask) -> None:
    """Load a task's data, turning a built-in task's unreachable hub into an error that names the offline tasks."""
    if task.data_loaded:
        return
    if type(task) in LOCAL_TASKS.values():  # reads data_root(); its errors already name the missing file
        task.load_data()
        return
    try:
        task.load_data()
    except Exception as exc:  # datasets/huggingface_hub raise many types for "no network" / "not cached"
        raise FileNotFoundError(
            f"The data of mteb task {task.metadata.name!r} ({task.metadata.dataset['path']}) could not be loaded "
            f"({type(exc).__name__}: {exc}). Built-in tasks download from the Hugging Face hub; offline, use a local "
            f"task: {', '.join(LOCAL_TASKS)}."
        ) from exc


# The SentEval transfer tasks register themselves on import; they subclass this module's _LocalTask.
from spt_embed.evaluation import senteval_tasks  # noqa: E402,F401
