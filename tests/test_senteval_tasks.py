"""SentEval transfer tasks as local mteb classification tasks: the bundled files read with SentEval's counts, and
mteb's protocol run end to end on toy data (a label-revealing encoder scores 1.0, a constant one does not)."""

from __future__ import annotations

from pathlib import Path

import mteb
from mteb.abstasks.classification import AbsTaskClassification
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.input_module import InputModule

from spt_embed.evaluation.mteb_tasks import LOCAL_TASKS, get_tasks, load_task_data
from spt_embed.evaluation.senteval_tasks import SENTEVAL_TASKS

REPO_DATA = Path(__file__).resolve().parents[1] / "data"

# SentEval's own counts (its README / the transfer-task paper): rows per split and number of classes.
SENTEVAL_SIZES = {
    "SentEvalMR": ({"train": 10662}, 2),
    "SentEvalCR": ({"train": 3771}, 2),  # SentEval counts 3,775 lines; 4 of them are blank and are left out
    "SentEvalSUBJ": ({"train": 10000}, 2),
    "SentEvalMPQA": ({"train": 10603}, 2),  # SentEval counts 10,606 lines; 3 of them are blank
    "SentEvalSST2": ({"train": 67349, "test": 1821}, 2),
    "SentEvalTREC": ({"train": 5452, "test": 500}, 6),
}


def test_all_six_registered_as_classification():
    assert sorted(SENTEVAL_TASKS) == sorted(SENTEVAL_SIZES)
    for name in SENTEVAL_TASKS:
        task = LOCAL_TASKS[name]()
        assert isinstance(task, AbsTaskClassification)
        assert task.metadata.main_score == "accuracy"


@pytest.mark.parametrize("name", sorted(SENTEVAL_SIZES))
def test_bundled_files_have_senteval_counts(monkeypatch, name):
    monkeypatch.setenv("SPT_EMBED_DATA", str(REPO_DATA))
    task = get_tasks([name])[0]
    load_task_data(task)
    sizes, classes = SENTEVAL_SIZES[name]
    assert {split: len(rows) for split, rows in task.dataset.items()} == sizes
    assert len(set(task.dataset["train"]["label"])) == classes
    assert all(text.strip() for split in task.dataset.values() for text in split["text"])


# ---------------------------------------------------------------------------------------------------------------
# mteb's protocol on toy data: texts "pos ..." / "neg ..." (and TREC-style questions)

_WORDS = ["red", "blue", "green", "big", "small", "old", "new", "fast", "slow", "warm", "cold", "dark"]


def _toy_sentences(word: str, n: int) -> list[str]:
    return [f"{word} {_WORDS[i % len(_WORDS)]} {i}" for i in range(n)]


def write_toy_senteval(root: Path) -> Path:
    base = root / "senteval_transfer"
    for folder, neg, pos in (("MR", "rt-polarity.neg", "rt-polarity.pos"), ("CR", "custrev.neg", "custrev.pos"),
                             ("SUBJ", "subj.objective", "subj.subjective"), ("MPQA", "mpqa.neg", "mpqa.pos")):
        (base / folder).mkdir(parents=True)
        (base / folder / neg).write_text("\n".join(_toy_sentences("neg", 30)) + "\n", encoding="utf-8")
        (base / folder / pos).write_text("\n".join(_toy_sentences("pos", 30)) + "\n", encoding="utf-8")
    (base / "SST" / "binary").mkdir(parents=True)
    for split, n in (("train", 40), ("test", 12)):
        rows = [f"{t} \t0" for t in _toy_sentences("neg", n)] + [f"{t} \t1" for t in _toy_sentences("pos", n)]
        (base / "SST" / "binary" / f"sentiment-{split}").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (base / "TREC").mkdir()
    for name, n in (("train_5500.label", 20), ("TREC_10.label", 5)):
        rows = [f"{label}:x {t}" for label in ("LOC", "NUM", "HUM") for t in _toy_sentences(label.lower(), n)]
        # one latin-1 byte, as the real train_5500.label has
        text = "\n".join(rows) + "\n"
        (base / "TREC" / name).write_bytes(text.encode("utf-8") if "TREC_10" in name else text.encode("latin-1") + b"LOC:x caf\xe9 loc\n")
    return root


class LabelModule(InputModule):
    """Embeds a text as the one-hot of its first word's class (or a constant vector)."""

    CLASSES = ["neg", "pos", "loc", "num", "hum", "caf\xe9"]

    def __init__(self, constant: bool = False):
        super().__init__()
        self.constant = constant
        self.max_seq_length = 64

    def preprocess(self, inputs, prompt=None, **kwargs):
        rows = []
        for text in inputs:
            hot = [0.0] * len(self.CLASSES)
            word = text.split()[0]
            hot[0 if self.constant else (self.CLASSES.index(word) if word in self.CLASSES else 2)] = 1.0
            rows.append(hot)
        return {"vectors": torch.tensor(rows)}

    def forward(self, features, **kwargs):
        features["sentence_embedding"] = features["vectors"]
        return features

    def get_embedding_dimension(self) -> int:
        return len(self.CLASSES)

    def save(self, *args, **kwargs) -> None:
        raise NotImplementedError


@pytest.mark.parametrize("name", sorted(SENTEVAL_SIZES))
def test_protocol_on_toy_data(tmp_path, monkeypatch, name):
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_senteval(tmp_path / "data")))

    def score(constant: bool) -> float:
        model = SentenceTransformer(modules=[LabelModule(constant)], device="cpu")
        result = mteb.evaluate(model, get_tasks([name])[0], cache=None, co2_tracker=False, show_progress_bar=False)
        return float(result.task_results[0].get_score())

    assert score(constant=False) == pytest.approx(1.0)
    assert score(constant=True) < 0.7  # chance level: the classes are balanced


def test_task_groups_name_the_registered_tasks():
    from spt_embed.evaluation.evaluate import DEFAULT_TASKS, SENTEVAL_TASKS as LIGHT_NAMES, expand_task_groups

    assert LIGHT_NAMES == SENTEVAL_TASKS  # the CLI's light copy of the names matches the registered classes
    assert expand_task_groups(["senteval"]) == list(SENTEVAL_TASKS)
    assert expand_task_groups(["STSBenchmark", "Panel"]) == list(DEFAULT_TASKS) + list(SENTEVAL_TASKS)
    assert expand_task_groups("SciFact") == ["SciFact"]
