"""Graded sources: a `score` column (similarities in 0..1) trains with CoSENT or AnglE, pair and triplet sources
with InfoNCE, in one run; the stsb-train-scored preset."""

import json

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import (
    AnglELoss,
    CoSENTLoss,
    MultipleNegativesRankingLoss,
)

import spt_embed
from spt_embed.datafiles import read_stsb
from spt_embed.training.data import PRESETS, load_pairs
from spt_embed.training.train import build_loss, load_datasets

from .test_data import DATA, write
from .test_train import WORDS, config, toy_pairs


def toy_scored(path, n=48):
    words = WORDS.split()
    rows = []
    for i in range(n):
        text = " ".join(words[(i * k) % len(words)] for k in (1, 3, 7))
        rows.append({"sentence1": f"{text} {i}", "sentence2": f"the {text} {i % 3}", "score": (i % 6) / 5})
    return write(path, rows)


def test_stsb_train_scored_preset():
    loaded = load_pairs("stsb-train-scored")
    s1, s2, scores = read_stsb(DATA / "stsb/sts-train.csv")
    assert loaded.column_names == ["anchor", "positive", "score"] and loaded.num_rows == 5749
    assert loaded["anchor"] == s1 and loaded["positive"] == s2
    assert torch.allclose(torch.tensor(loaded["score"]), torch.tensor(scores) / 5)
    assert "stsb-train-scored" in PRESETS and "sts-test" not in PRESETS["stsb-train-scored"].path


def test_a_score_column_makes_a_file_graded(tmp_path):
    loaded = load_pairs(toy_scored(tmp_path / "scored.jsonl"))
    assert loaded.column_names == ["anchor", "positive", "score"]
    assert loaded[1] == {"anchor": loaded["anchor"][1], "positive": loaded["positive"][1], "score": pytest.approx(0.2)}


@pytest.mark.parametrize("bad", [1.5, -0.1, "high", None, float("nan"), True])
def test_scores_outside_0_1_are_refused(tmp_path, bad):
    rows = [{"sentence1": "a b", "sentence2": "c d", "score": 0.5}, {"sentence1": "e f", "sentence2": "g", "score": bad}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"row 2, column 'score': expected a similarity in \[0, 1\].*divided by 5"):
        load_pairs(path)


def test_graded_triplets_are_refused(tmp_path):
    rows = [{"anchor": "a", "positive": "b", "negative": "c", "score": 0.5}]
    with pytest.raises(ValueError, match="graded source .* pairs, not triplets"):
        load_pairs(write(tmp_path / "t.jsonl", rows))


def test_losses_per_source(tmp_path, backbones):
    pairs, scored = toy_pairs(tmp_path / "pairs.jsonl"), toy_scored(tmp_path / "scored.jsonl")
    model = spt_embed.SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")
    cfg = config(tmp_path, backbones["llama"], data=[str(pairs), str(scored)])
    data = load_datasets(cfg)
    losses = build_loss(model, cfg, data)
    assert isinstance(losses["pairs"], MultipleNegativesRankingLoss) and isinstance(losses["scored"], CoSENTLoss)
    cfg = config(tmp_path, backbones["llama"], data=[str(scored)], graded_loss="angle")
    assert isinstance(build_loss(model, cfg, load_datasets(cfg)), AnglELoss)
    cfg = config(tmp_path, backbones["llama"], data=[str(pairs), str(pairs)])  # one kind: one loss
    assert isinstance(build_loss(model, cfg, load_datasets(cfg)), MultipleNegativesRankingLoss)


def test_training_on_pairs_and_a_graded_source(tmp_path, backbones):
    scored = toy_scored(tmp_path / "scored.jsonl")
    cfg = config(tmp_path, backbones["llama"], max_steps=8, save_steps=4)
    cfg.data = [*cfg.data, str(scored)]
    before = spt_embed.SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, seed=3)
    model = spt_embed.train(cfg)
    assert not torch.equal(model.prompt_module.soft_prompt, before.prompt_module.soft_prompt)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["graded_loss"] == "cosent" and saved["data"][-1] == str(scored)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if "loss" in r) == 8
