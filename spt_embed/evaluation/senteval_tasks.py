"""SentEval's transfer tasks (Conneau & Kiela 2018) as local mteb classification tasks over data/senteval_transfer.

A broad guard for an encoder trained on one kind of data: sentiment (MR, CR, SST-2), subjectivity (SUBJ), opinion
polarity (MPQA) and question type (TREC), each a logistic regression on frozen embeddings with mteb's own
classification protocol (its `LogisticRegression`, its scores; main score accuracy).

| task          | split as SentEval defines it                      | classifier trained on                         |
|---------------|---------------------------------------------------|-----------------------------------------------|
| SentEvalMR    | no split: 10-fold cross-validation (10,662)       | the other 9 folds                             |
| SentEvalCR    | no split: 10-fold cross-validation (3,771)        | the other 9 folds                             |
| SentEvalSUBJ  | no split: 10-fold cross-validation (10,000)       | the other 9 folds                             |
| SentEvalMPQA  | no split: 10-fold cross-validation (10,603)       | the other 9 folds                             |
| SentEvalSST2  | test (1,821 sentences)                            | 2,000 phrases a label drawn from train (67,349) |
| SentEvalTREC  | test (TREC_10, 500 questions; 6 coarse labels)    | all of train_5500 (5,452)                     |

SentEval tunes the classifier's L2 penalty by an inner cross-validation; mteb's protocol keeps a fixed
`LogisticRegression(max_iter=100)`, so absolute numbers are not SentEval's. SST-2's 67,349 training phrases would
cost more to encode than the other five tasks together on a CPU; mteb's undersampling (seeded) keeps 2,000 a label.
Blank lines (4 in CR, 3 in MPQA, which SentEval keeps as empty sentences) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mteb
from datasets import Dataset
from mteb.abstasks.classification import AbsTaskClassification

from spt_embed.evaluation.mteb_tasks import _LocalTask, register_local_task

FOLDER = "senteval_transfer"
ALL_SAMPLES = 1_000_000  # samples_per_label above any class size: the classifier sees every training row


def _metadata(name: str, description: str, splits: list[str], reference: str) -> mteb.TaskMetadata:
    return mteb.TaskMetadata(
        name=name,
        description=f"{description} SentEval transfer task, local copy read from spt-embed's data/{FOLDER}.",
        reference=reference,
        dataset={"path": f"data/{FOLDER}", "revision": "local"},
        type="Classification",
        category="t2c",
        modalities=["text"],
        eval_splits=splits,
        eval_langs=["eng-Latn"],
        main_score="accuracy",
        domains=["Written"],
        task_subtypes=[],
        license="not specified",
        annotations_creators="human-annotated",
        sample_creation="found",
        bibtex_citation="",
    )


def _lines(path: Path) -> list[str]:
    # SentEval reads these files as latin-1 where they are not UTF-8 (TREC's train_5500 has a few such bytes).
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


class _BinaryCrossValidated(_LocalTask, AbsTaskClassification):
    """Two files of sentences, one per class; SentEval scores these by 10-fold cross-validation."""

    files: tuple[str, str]  # (label 0 file, label 1 file), relative to data/senteval_transfer
    is_cross_validation = True
    n_splits = 10
    samples_per_label = ALL_SAMPLES
    n_experiments = 1
    available_splits = ("train",)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        texts: list[str] = []
        labels: list[int] = []
        for label, relative in enumerate(self.files):
            rows = _lines(self._read(f"{FOLDER}/{relative}"))
            texts += rows
            labels += [label] * len(rows)
        self.dataset = {"train": Dataset.from_dict({"text": texts, "label": labels})}
        self._finish_reading()


@register_local_task
class SentEvalMR(_BinaryCrossValidated):
    metadata = _metadata(
        "SentEvalMR", "Movie review snippets, positive or negative (Pang & Lee 2005).", ["train"],
        "https://www.cs.cornell.edu/people/pabo/movie-review-data/",
    )
    files = ("MR/rt-polarity.neg", "MR/rt-polarity.pos")


@register_local_task
class SentEvalCR(_BinaryCrossValidated):
    metadata = _metadata(
        "SentEvalCR", "Product review sentences, positive or negative (Hu & Liu 2004).", ["train"],
        "https://www.cs.uic.edu/~liub/FBS/sentiment-analysis.html",
    )
    files = ("CR/custrev.neg", "CR/custrev.pos")


@register_local_task
class SentEvalSUBJ(_BinaryCrossValidated):
    metadata = _metadata(
        "SentEvalSUBJ", "Movie sentences, subjective or objective (Pang & Lee 2004).", ["train"],
        "https://www.cs.cornell.edu/people/pabo/movie-review-data/",
    )
    files = ("SUBJ/subj.objective", "SUBJ/subj.subjective")


@register_local_task
class SentEvalMPQA(_BinaryCrossValidated):
    metadata = _metadata(
        "SentEvalMPQA", "Opinion phrases, positive or negative polarity (Wiebe et al. 2005).", ["train"],
        "https://mpqa.cs.pitt.edu/",
    )
    files = ("MPQA/mpqa.neg", "MPQA/mpqa.pos")


@register_local_task
class SentEvalSST2(_LocalTask, AbsTaskClassification):
    metadata = _metadata(
        "SentEvalSST2", "Stanford Sentiment Treebank, binary (Socher et al. 2013).", ["test"],
        "https://nlp.stanford.edu/sentiment/",
    )
    samples_per_label = 2000
    n_experiments = 1

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        self.dataset = {}
        for split, name in (("train", "sentiment-train"), ("test", "sentiment-test")):
            path = self._read(f"{FOLDER}/SST/binary/{name}")
            texts, labels = [], []
            for number, line in enumerate(_lines(path), start=1):
                text, _, label = line.rpartition("\t")
                if label not in ("0", "1") or not text.strip():
                    raise ValueError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line[:80]!r}.")
                texts.append(text.strip())
                labels.append(int(label))
            self.dataset[split] = Dataset.from_dict({"text": texts, "label": labels})
        self._finish_reading()


@register_local_task
class SentEvalTREC(_LocalTask, AbsTaskClassification):
    metadata = _metadata(
        "SentEvalTREC", "Question type, 6 coarse classes (Li & Roth 2002).", ["test"],
        "https://cogcomp.seas.upenn.edu/Data/QA/QC/",
    )
    samples_per_label = ALL_SAMPLES
    n_experiments = 1

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self._start_reading()
        rows = {split: _lines(self._read(f"{FOLDER}/TREC/{name}")) for split, name in
                (("train", "train_5500.label"), ("test", "TREC_10.label"))}
        # "LOC:city What county is ...": the coarse class before the colon is the label, as in SentEval.
        coarse = {split: [line.split(" ", 1) for line in lines] for split, lines in rows.items()}
        names = sorted({label.split(":", 1)[0] for pairs in coarse.values() for label, _ in pairs})
        index = {name: i for i, name in enumerate(names)}
        self.dataset = {
            split: Dataset.from_dict(
                {"text": [text for _, text in pairs], "label": [index[label.split(":", 1)[0]] for label, _ in pairs]}
            )
            for split, pairs in coarse.items()
        }
        self._finish_reading()


SENTEVAL_TASKS = tuple(cls.metadata.name for cls in (SentEvalMR, SentEvalCR, SentEvalSUBJ, SentEvalMPQA, SentEvalSST2, SentEvalTREC))
