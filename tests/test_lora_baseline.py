"""The LoRA baseline (`spt-embed train --method lora`) on tiny models: only LoRA trains, the loss falls, the merged
folder reloads through `spt-embed eval`'s loader with the same embeddings, and baselines save and load."""

import json

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from transformers import TrainerCallback

import spt_embed
from spt_embed.cli.main import main
from spt_embed.evaluation.evaluate import load_model, resolve_model
from spt_embed.model.baselines import BACKBONE_SUBDIR, BASELINE_CONFIG_NAME, baseline_encoder
from spt_embed.recipe import latest_checkpoint
from spt_embed.training.train import checkpoint_weights
from spt_embed.training.train_config import Method
from tests.conftest import SENTENCES, Kill
from tests.test_eval import write_toy_data
from tests.test_train import config, toy_pairs


def mean_loss(model, data_path):
    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        feats = [model[0].preprocess([r[c] for r in rows]) for c in ("anchor", "positive")]
        return MultipleNegativesRankingLoss(model, scale=20.0)(feats, None).item()


class Snapshot(TrainerCallback):
    """Records, at the end of training (before the merge), what was trainable and the base weights."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_lora_trains_only_lora_and_saves_a_merged_encoder(tmp_path, backbones):
    cfg = config(
        tmp_path, backbones["llama"], method="lora", lr=1e-2, max_steps=8, eval_steps=4, save_steps=4, eval_pairs=40,
        lora_r=4,
    )
    before = baseline_encoder(backbones["llama"], "prompteol", max_length=128, device="cpu")
    original = {k: v.clone() for k, v in before[0].backbone.state_dict().items()}
    snapshot = Snapshot()
    model = spt_embed.train(cfg, callbacks=[snapshot])

    assert snapshot.trainable and all("lora_" in name for name in snapshot.trainable)
    for name, value in snapshot.base.items():  # "0.backbone.base_model.model.<key>[.base_layer].weight"
        key = name.split("base_model.model.", 1)[1].replace(".base_layer", "")
        assert torch.equal(value, original[key]), name
    merged = model[0].backbone.state_dict()
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], original["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["layers.0.mlp.up_proj.weight"], original["layers.0.mlp.up_proj.weight"])
    assert mean_loss(model, tmp_path / "pairs.jsonl") < mean_loss(before, tmp_path / "pairs.jsonl") - 0.05

    out = tmp_path / "run"
    for name in ("modules.json", BASELINE_CONFIG_NAME, "train_config.json", "train_log.jsonl", "training.png"):
        assert (out / name).is_file(), name
    assert (out / BACKBONE_SUBDIR / "config.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["method"] == "lora"
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    resolved = resolve_model(out)
    assert resolved.kind == "sentence-transformer"
    reloaded = load_model(resolved, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert (reloaded - expected).abs().max().item() <= 1e-5
    # The best dev checkpoint holds the unmerged LoRA adapter on the named backbone; the returned model is that
    # checkpoint merged, and merging changed nothing.
    state = latest_checkpoint(out, checkpoint_weights(Method.LORA)) / "trainer_state.json"
    best = json.loads(state.read_text())["best_model_checkpoint"]
    unmerged = load_model(resolve_model(best), device="cpu")
    assert unmerged[0].has_lora
    assert (unmerged.encode(SENTENCES, convert_to_tensor=True) - expected).abs().max().item() <= 1e-5


def test_lora_resume_matches_uninterrupted_run(tmp_path, backbones):
    common = dict(method="lora", lr=1e-2, max_steps=8, lora_r=4, lora_targets=["q_proj", "v_proj"])
    straight = spt_embed.train(config(tmp_path / "a", backbones["llama"], **common))
    killed = config(tmp_path / "b", backbones["llama"], **common)
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(killed, callbacks=[Kill(5)])
    assert latest_checkpoint(tmp_path / "b" / "run", checkpoint_weights(Method.LORA)).name == "checkpoint-4"
    with pytest.raises(ValueError, match="--method lora"):
        spt_embed.train(config(tmp_path / "b", backbones["llama"]), resume=True)  # an spt run over lora checkpoints
    resumed = spt_embed.train(killed, resume=True)
    a, b = (m.encode(SENTENCES, convert_to_tensor=True) for m in (straight, resumed))
    assert (a - b).abs().max().item() <= 1e-5
    untrained = baseline_encoder(backbones["llama"], "prompteol", max_length=128, device="cpu")
    assert (a - untrained.encode(SENTENCES, convert_to_tensor=True)).abs().max().item() > 1e-2


@pytest.mark.parametrize("baseline", ["mean", "prompteol"])
def test_zero_shot_baseline_saves_a_reference_and_reloads(tmp_path, backbones, baseline):
    model = baseline_encoder(backbones["qwen2"], baseline, device="cpu")
    model.save(str(tmp_path / "b"))
    assert not (tmp_path / "b" / BACKBONE_SUBDIR).exists()  # the unchanged backbone is only named
    reloaded = load_model(resolve_model(tmp_path / "b"), device="cpu")
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    assert torch.equal(expected, reloaded.encode(SENTENCES, convert_to_tensor=True))


def test_cli_train_lora_then_eval(tmp_path, backbones, capsys, monkeypatch):
    monkeypatch.setenv("SPT_EMBED_DATA", str(write_toy_data(tmp_path / "data")))
    data = toy_pairs(tmp_path / "pairs.jsonl")
    common = ["train", "--method", "lora", "--backbone", str(backbones["qwen2"]), "--max-steps", "2",
              "--batch-size", "4", "--eval-steps", "0", "--save-steps", "2", "--data", str(data), "--lora-r", "4"]
    assert main([*common, "--lora-targets", "q_proj", "v_proj", "--output", str(tmp_path / "cli")]) == 0
    saved = json.loads((tmp_path / "cli" / "train_config.json").read_text())
    assert (saved["method"], saved["lora_r"], saved["lora_targets"]) == ("lora", 4, ["q_proj", "v_proj"])
    assert load_model(resolve_model(tmp_path / "cli"), device="cpu").encode(["hello"]).shape == (1, 32)
    capsys.readouterr()
    eval_argv = ["eval", "--model", str(tmp_path / "cli"), "--tasks", "STSBenchmark", "--output", str(tmp_path / "ev")]
    assert main(eval_argv) == 0
    assert "STSBenchmark" in capsys.readouterr().out and (tmp_path / "ev" / "STSBenchmark.json").is_file()
    assert main([*common, "--lora-targets", "nope_proj", "--output", str(tmp_path / "bad")]) == 2
    assert "lora_targets" in capsys.readouterr().err
    assert main([*common, "--method", "dora", "--output", str(tmp_path / "bad2")]) == 2
    assert "method='dora' is not supported" in capsys.readouterr().err
