"""Mined hard negatives (issue 17): `mine_negatives` gives the named retrieval sources a `negative` column mined by
sentence-transformers' `mine_hard_negatives` with the encoder as training starts, over the source's training
passages only; a resumed run reuses the mined rows its start saved. Tiny random backbones."""

import json
import zlib

import datasets
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.input_module import InputModule

import spt_embed
from spt_embed.training import mining
from spt_embed.training.mining import MINED, mine_negatives
from spt_embed.training.train import build_model, is_run_entry, load_datasets, split_retrieval_dev
from spt_embed.training.train_config import TrainConfig
from tests.conftest import Kill

from .test_task_prompts import TASKS, qa_pairs
from .test_train import config as train_config


def two_sources(tmp_path, backbone, **overrides):
    """A config with two retrieval files, `qa` (mined, 8 dev rows held out) and `other` (not mined)."""
    qa = str(qa_pairs(tmp_path / "qa.jsonl", n=56))
    other = str(qa_pairs(tmp_path / "other.jsonl", n=40))
    values = dict(data=[qa, other], retrieval_data=[qa, other], tasks=TASKS, retrieval_dev_rows=8,
                  mine_negatives=[qa])
    return train_config(tmp_path, backbone, **{**values, **overrides})


def perturbed(model):
    """The two task prompts made to differ from each other and from the default one, as after training."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in model.prompt_module.task_prompts.values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


def test_mining_adds_a_negative_to_the_named_source_only(tmp_path, backbones):
    cfg = two_sources(tmp_path, backbones["llama"])
    train, held_out = split_retrieval_dev(load_datasets(cfg), cfg)
    mixed, mined = mine_negatives(train, build_model(cfg), cfg, tmp_path / "run", reuse=False)
    assert mixed["qa"].column_names == ["anchor", "positive", "negative"]
    assert mixed["other"].column_names == ["anchor", "positive"] and mixed["other"] is train["other"]
    assert list(mixed["qa"]["anchor"]) == list(train["qa"]["anchor"])  # every training row, in order
    assert list(mixed["qa"]["positive"]) == list(train["qa"]["positive"])
    record = mined["qa"].record
    assert record["rows"] == len(train["qa"]) == 48 and record["mined"] + record["random"] == 48
    assert record["mined"] > 0 and record["corpus"] == 48
    training_passages = set(train["qa"]["positive"])
    held_out_only = set(held_out["qa"]["positive"]) - training_passages
    assert held_out_only  # the test means something: the dev rows have passages of their own
    for row in mixed["qa"]:
        assert row["negative"] != row["positive"]
        assert row["negative"] in training_passages  # the source's own training passages, nothing else
    assert not set(mixed["qa"]["negative"]) & held_out_only  # a held-out dev row is never a negative
    assert not (tmp_path / "run").exists()  # nothing written before the run folder is started


def test_mining_routes_queries_and_passages_through_their_prompts(tmp_path, backbones, monkeypatch):
    """With task prompts, mining encodes the queries through the `query` soft prompt and the passages through the
    `document` one (as training routes a retrieval source), and every mined negative keeps the margin."""
    cfg = two_sources(tmp_path, backbones["llama"], mine_relative_margin=0.0)
    train, _ = split_retrieval_dev(load_datasets(cfg), cfg)
    model = perturbed(build_model(cfg))
    module = model.prompt_module
    seen: set[str | None] = set()
    original = module.soft_prompt_for
    monkeypatch.setattr(module, "soft_prompt_for", lambda task: seen.add(task) or original(task))
    mixed, mined = mine_negatives(train, model, cfg, tmp_path / "run", reuse=False)
    assert seen == {"query", "document"}
    assert mined["qa"].record["mined"] > 24  # margin 0: a passage scoring below the positive is found for most rows
    corpus = list(dict.fromkeys(train["qa"]["positive"]))
    queries = model.encode_query(list(train["qa"]["anchor"]), convert_to_tensor=True, normalize_embeddings=True)
    scores = (queries @ model.encode_document(corpus, convert_to_tensor=True, normalize_embeddings=True).T).tolist()
    # A tiny random backbone scores every pair nearly alike, so only the guard is checked here (the choice itself
    # is, with separable embeddings, in the next test); mined rows are those whose negative passes it.
    kept = sum(scores[i][corpus.index(row["negative"])] <= scores[i][corpus.index(row["positive"])] + 1e-6
               for i, row in enumerate(mixed["qa"]))
    assert kept >= mined["qa"].record["mined"]


class SidedToy(InputModule):
    """Each text gets a fixed random vector per task (query, document, none): mining picks its negatives by the
    query vectors against the document vectors only if it routes the two sides as training does."""

    def __init__(self):
        super().__init__()
        self.max_seq_length = 512
        self.tasks: set[str | None] = set()

    @staticmethod
    def vector(task, text):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{task}|{text}".encode()))
        return torch.randn(8, generator=generator)

    def preprocess(self, inputs, prompt=None, **kwargs):
        self.tasks.add(kwargs.get("task"))
        return {"vectors": torch.stack([self.vector(kwargs.get("task"), text) for text in inputs])}

    def forward(self, features, **kwargs):
        features["sentence_embedding"] = features["vectors"]
        return features

    def get_embedding_dimension(self) -> int:
        return 8

    def save(self, *args, **kwargs) -> None:
        raise NotImplementedError


@pytest.mark.parametrize("margin, range_min, max_score", [(0.05, 0, None), (0.0, 1, None), (0.05, 0, 0.3)])
def test_mined_negative_is_the_best_guarded_passage(tmp_path, margin, range_min, max_score):
    """The negative is the (range_min+1)-th best passage by query . document cosine among those that are not the
    row's positive, score at least `margin` of the positive's magnitude below it and at most max_score; a row
    without one gets a random other passage (mine_range_max above the corpus size: the whole corpus ranks)."""
    rows = datasets.Dataset.from_dict({"anchor": [f"question {i}" for i in range(40)],
                                       "positive": [f"passage {i}" for i in range(40)]})
    cfg = TrainConfig(output=str(tmp_path / "o"), data=["qa.jsonl"], retrieval_data=["qa.jsonl"], batch_size=8,
                      mine_negatives=["qa.jsonl"], mine_range_max=1000, mine_relative_margin=margin,
                      mine_range_min=range_min, mine_max_score=max_score)
    toy = SidedToy()
    mixed, mined = mine_negatives(rows, SentenceTransformer(modules=[toy], device="cpu"), cfg, tmp_path, reuse=False)
    assert toy.tasks == {"query", "document"}
    corpus = list(rows["positive"])
    unit = lambda task, text: torch.nn.functional.normalize(SidedToy.vector(task, text), dim=0)  # noqa: E731
    documents = torch.stack([unit("document", text) for text in corpus])
    random_rows = 0
    for row in mixed:
        scores = (documents @ unit("query", row["anchor"])).tolist()
        positive = scores[corpus.index(row["positive"])]
        threshold = positive - abs(positive) * margin
        allowed = sorted((score, text) for score, text in zip(scores, corpus)
                         if text != row["positive"] and score <= threshold
                         and (max_score is None or score <= max_score))[::-1]
        assert row["negative"] != row["positive"]
        if len(allowed) > range_min:
            assert row["negative"] == allowed[range_min][1]
        else:
            random_rows += 1
    assert mined["qa"].record["random"] == random_rows < 40 and mined["qa"].record["mined"] == 40 - random_rows


def test_a_run_records_and_resume_reuses_the_mined_rows(tmp_path, backbones, monkeypatch):
    cfg = two_sources(tmp_path, backbones["llama"], max_steps=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(cfg, callbacks=[Kill(2)])
    out = tmp_path / "run"
    saved = datasets.Dataset.from_parquet(str(out / MINED / "qa.parquet"))
    record = json.loads((out / MINED / "qa.json").read_text())
    assert saved.column_names == ["anchor", "positive", "negative"] and len(saved) == record["rows"] == 48
    assert record["settings"] == mining.mining_settings(cfg, cfg.mine_negatives[0])
    config = json.loads((out / "train_config.json").read_text())
    assert config["mine_negatives"] == cfg.mine_negatives and config["mine_relative_margin"] == 0.05
    assert config["mined_negatives"]["qa"]["reused"] is False
    assert is_run_entry(MINED, config)  # --overwrite may remove it

    def refuse(*args, **kwargs):
        raise AssertionError("a resume mined again instead of reusing the saved rows")

    monkeypatch.setattr(mining, "_mine", refuse)
    spt_embed.train(cfg, resume=True)
    config = json.loads((out / "train_config.json").read_text())
    assert config["resumed_from_step"] == 2 and config["mined_negatives"]["qa"]["reused"] is True
    train, _ = split_retrieval_dev(load_datasets(cfg), cfg)
    again, mined = mine_negatives(train, None, cfg, out, reuse=True)
    assert mined["qa"].reused and list(again["qa"]["negative"]) == list(saved["negative"])
    # Other mining settings (a resume with --resume-anyway): the saved rows do not match, so it mines again.
    other = TrainConfig(**{**cfg.to_dict(), "mine_relative_margin": 0.1})
    with pytest.raises(AssertionError, match="mined again"):
        mine_negatives(train, None, other, out, reuse=True)


def test_bad_mining_options_are_refused(tmp_path, backbones):
    qa = str(qa_pairs(tmp_path / "qa.jsonl"))
    base = dict(output=str(tmp_path / "o"), eval_steps=0)
    for values, message in (
        (dict(data=["snli-triplets"], mine_negatives=["medquad-qa"]), "not among the training sources"),
        (dict(data=["snli-triplets"], mine_negatives=["snli-triplets"]), "not a retrieval source"),
        (dict(data=[qa], mine_negatives=[qa]), "name it in retrieval_data"),
        (dict(data=["scifact-train"], mine_negatives=["scifact-train"] * 2), "twice"),
        (dict(data=["scifact-train"], mine_negatives=["scifact-train"], mine_range_min=-1), "mine_range_min"),
        (dict(data=["scifact-train"], mine_negatives=["scifact-train"], mine_range_min=5, mine_range_max=5),
         "must exceed mine_range_min"),
        (dict(data=["scifact-train"], mine_negatives=["scifact-train"], mine_relative_margin=1.0), "in \\[0, 1\\)"),
        (dict(data=["scifact-train"], mine_negatives=["scifact-train"], mine_max_score=1.5), "mine_max_score"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**base, **values)
    # A source that already has a negative: a preset (squad-qa's same-article paragraph) or a triplet file.
    squad = TrainConfig(**base, data=["squad-qa"], mine_negatives=["squad-qa"])
    triplets = datasets.Dataset.from_dict({"anchor": ["q"], "positive": ["p"], "negative": ["n"]})
    with pytest.raises(ValueError, match="already has a negative column.*same article"):
        mine_negatives(triplets, None, squad, tmp_path / "o", reuse=False)
    rows = [{"anchor": f"q {i}", "positive": f"p {i}", "negative": f"n {i}"} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = train_config(tmp_path, backbones["llama"], data=[str(tmp_path / "t.jsonl")],
                       retrieval_data=[str(tmp_path / "t.jsonl")], mine_negatives=[str(tmp_path / "t.jsonl")])
    with pytest.raises(ValueError, match="already has a negative column"):
        spt_embed.train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
