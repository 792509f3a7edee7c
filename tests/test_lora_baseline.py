"""The LoRA baseline (`spt-embed train --method lora`) on tiny models: only LoRA trains, the loss falls, the run
saves its adapter only (lora/, the backbone named), which reloads through spt_embed.load, sentence-transformers with
trust_remote_code and `spt-embed eval`'s loader (merged in memory there) with the same embeddings; `info` counts its
parameters; `merge-lora` writes a merged copy; merged folders of earlier versions still load; baselines save and
load."""

import json
import re

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from transformers import TrainerCallback

import spt_embed
from spt_embed.cli.main import main
from spt_embed.evaluation.evaluate import load_model, resolve_model
from spt_embed.model.base import BACKBONE_SUBDIR
from spt_embed.model.baselines import BASELINE_CONFIG_NAME, baseline_encoder
from spt_embed.model.encoder import open_encoder
from spt_embed.model.lora import LORA_SUBDIR, LORA_WEIGHTS, lora_baseline_encoder, merge_lora_folder
from spt_embed.model.prefix import prefix_baseline_encoder
from spt_embed.recipe import latest_checkpoint
from spt_embed.training.train import checkpoint_weights
from spt_embed.training.train_config import Method
from tests.conftest import SENTENCES, Kill, move_lora_b
from tests.test_eval import write_toy_data
from tests.test_train import config, toy_pairs

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # lora_targets' default


def mean_loss(model, data_path):
    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        feats = [model[0].preprocess([r[c] for r in rows]) for c in ("anchor", "positive")]
        return MultipleNegativesRankingLoss(model, scale=20.0)(feats, None).item()


class Snapshot(TrainerCallback):
    """Records, at the end of training, what was trainable and the base weights."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def encode(model, texts=SENTENCES):
    return model.encode(texts, convert_to_tensor=True)


def lora_size(backbone, r, targets=TARGETS) -> int:
    """LoRA's parameters on `backbone`: r x (in + out) for every target projection (A: r x in, B: out x r)."""
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in backbone.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )


def info(capsys, folder) -> dict[str, str]:
    """`spt-embed info`'s rows (a name padded to the longest, two spaces, the value) as a dict."""
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    return dict(re.split(r" {2,}", line.strip(), maxsplit=1) for line in capsys.readouterr().out.splitlines())


def test_lora_trains_only_lora_and_saves_the_adapter_only(tmp_path, backbones, capsys):
    cfg = config(
        tmp_path, backbones["llama"], method="lora", lr=1e-2, max_steps=8, eval_steps=4, save_steps=4, eval_pairs=40,
        lora_r=4,
    )
    before = baseline_encoder(backbones["llama"], "prompteol", max_length=128, device="cpu")
    original = {k: v.clone() for k, v in before[0].backbone.state_dict().items()}
    snapshot = Snapshot()
    model = spt_embed.train(cfg, callbacks=[snapshot])

    # Only LoRA trained: every other weight is the backbone's own, during training and in the returned model.
    assert snapshot.trainable and all("lora_" in name for name in snapshot.trainable)
    for name, value in snapshot.base.items():  # "0.backbone.base_model.model.<key>[.base_layer].weight"
        key = name.split("base_model.model.", 1)[1].replace(".base_layer", "")
        assert torch.equal(value, original[key]), name
    assert model[0].has_lora  # returned as trained and saved: the adapter on the frozen backbone
    base = model[0].backbone.get_base_model().state_dict()
    for key, value in base.items():
        if "lora_" not in key:
            assert torch.equal(value, original[key.replace(".base_layer", "")]), key
    trained_b = [v for k, v in base.items() if "lora_B" in k]
    assert trained_b and all(v.abs().max() > 0 for v in trained_b)  # LoRA's B starts at zero: it moved
    assert mean_loss(model, tmp_path / "pairs.jsonl") < mean_loss(before, tmp_path / "pairs.jsonl") - 0.05

    # The folder: the adapter only (lora/), the backbone named and fingerprinted as for every other method.
    out = tmp_path / "run"
    for name in ("modules.json", BASELINE_CONFIG_NAME, "train_config.json", "train_log.jsonl", "training.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "train_config.json").read_text())["method"] == "lora"
    assert json.loads((out / "modules.json").read_text())[0]["type"] == "spt_embed.model.baselines.BaselineModule"
    assert not (out / BACKBONE_SUBDIR).exists()
    assert (out / LORA_SUBDIR / "adapter_config.json").is_file()
    trained = lora_size(before[0].backbone, r=4)
    assert model[0].adapter_parameters() == trained
    weights = (out / LORA_WEIGHTS).stat().st_size
    backbone_bytes = (backbones["llama"] / "model.safetensors").stat().st_size
    assert trained * 4 <= weights <= trained * 4 + 16_384 < backbone_bytes  # fp32 LoRA matrices and a header
    saved = json.loads((out / BASELINE_CONFIG_NAME).read_text())
    assert saved["backbone"]["source"] == str(backbones["llama"]) and saved["trained_from"] is None
    assert saved["backbone"]["fingerprint"] == before[0].backbone_ref.fingerprint

    # It reloads as it was saved (spt_embed.load, sentence-transformers' own loader) with the same embeddings; the
    # eval loader (open_encoder) merges it in memory, as a merged folder would load, and writes nothing.
    expected = encode(model)
    for reloaded in (spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu")):
        assert reloaded[0].has_lora
        assert (encode(reloaded) - expected).abs().max().item() <= 1e-5
    resolved = resolve_model(out)
    assert resolved.kind == "sentence-transformer"
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    evaluated = load_model(resolved, device="cpu")
    assert not evaluated[0].has_lora and evaluated[0].trained_from is not None  # merged in memory
    assert (encode(evaluated) - expected).abs().max().item() <= 1e-5
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files
    unmerged = open_encoder(out, device="cpu", merge_lora=False)
    assert unmerged[0].has_lora and (encode(unmerged) - expected).abs().max().item() <= 1e-5

    # The best dev checkpoint holds the same adapter: the returned model is that checkpoint.
    state = latest_checkpoint(out, checkpoint_weights(Method.LORA)) / "trainer_state.json"
    best = json.loads(state.read_text())["best_model_checkpoint"]
    checkpoint = spt_embed.load(best)
    assert checkpoint[0].has_lora
    assert (encode(checkpoint) - expected).abs().max().item() <= 1e-5

    # info: the method, LoRA's shape, its parameters and their share, as for prefix.
    rows = info(capsys, out)
    total = sum(p.numel() for p in before[0].parameters()) + trained
    assert rows["method"] == "lora"
    assert rows["LoRA"] == f"r=4, alpha=32 on {', '.join(sorted(TARGETS))}"
    assert rows["trained parameters"] == f"{trained:,}"
    assert rows["trained share"] == f"{100 * trained / total:.4f} %"
    assert rows["total parameters"] == f"{total:,}"


def test_merge_lora_writes_a_merged_copy_with_the_same_embeddings(tmp_path, backbones, capsys):
    lora = lora_baseline_encoder(backbones["qwen2"], r=2, targets=["q_proj", "v_proj"], max_length=64, device="cpu")
    move_lora_b(lora, 0.5)  # fresh LoRA layers change nothing until trained; make them count
    lora.save(str(tmp_path / "lora"))
    expected = encode(lora)
    trained = lora[0].adapter_parameters()
    assert trained == lora_size(lora[0].backbone.get_base_model(), r=2, targets=("q_proj", "v_proj"))
    before = sorted(p.relative_to(tmp_path / "lora") for p in (tmp_path / "lora").rglob("*"))

    (tmp_path / "merged").mkdir()  # an empty folder is fine
    capsys.readouterr()
    assert main(["merge-lora", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    assert "merged the LoRA" in capsys.readouterr().out
    merged_dir = tmp_path / "merged"
    assert (merged_dir / BACKBONE_SUBDIR / "config.json").is_file() and not (merged_dir / LORA_SUBDIR).exists()
    assert sorted(p.relative_to(tmp_path / "lora") for p in (tmp_path / "lora").rglob("*")) == before  # untouched
    for reloaded in (
        spt_embed.load(merged_dir),
        SentenceTransformer(str(merged_dir), trust_remote_code=True, device="cpu"),
        open_encoder(merged_dir, device="cpu"),
    ):
        assert reloaded[0].peft_kind is None and reloaded[0].trained_from is not None
        assert (encode(reloaded) - expected).abs().max().item() <= 1e-5
    # The adapter folder merged in memory for encoding gives the merged folder's embeddings, bit for bit.
    assert torch.equal(encode(open_encoder(tmp_path / "lora", device="cpu")), encode(spt_embed.load(merged_dir)))

    rows = info(capsys, merged_dir)
    assert rows["method"] == "lora (merged into the backbone's weights)"
    assert rows["LoRA"] == "r=2, alpha=32 on q_proj, v_proj (merged)"
    assert rows["trained parameters"] == f"{trained:,}"
    total = sum(p.numel() for p in lora[0].parameters())  # backbone + LoRA, as before the merge
    assert rows["trained share"] == f"{100 * trained / total:.4f} %"

    # Refused, with nothing written: the same folder or one inside it, a non-empty output, a folder with no LoRA.
    refusals = [
        ((tmp_path / "lora", tmp_path / "lora"), ValueError, "is the LoRA folder"),
        ((tmp_path / "lora", tmp_path / "lora" / "m"), ValueError, "is inside the LoRA folder"),
        ((tmp_path / "lora", merged_dir), FileExistsError, "not an empty folder"),
        ((merged_dir, tmp_path / "again"), ValueError, "merged already"),
        ((backbones["qwen2"], tmp_path / "again"), ValueError, "is not a LoRA baseline folder"),
    ]
    prefix = prefix_baseline_encoder(backbones["qwen2"], num_tokens=2, device="cpu")
    prefix.save(str(tmp_path / "prefix"))
    refusals.append(((tmp_path / "prefix", tmp_path / "again"), ValueError, "prefix adapter"))
    for (source, output), error, message in refusals:
        with pytest.raises(error, match=message):
            merge_lora_folder(source, output)
    assert not (tmp_path / "again").exists() and not (tmp_path / "lora" / "m").exists()
    assert main(["merge-lora", str(tmp_path / "prefix"), str(tmp_path / "again")]) == 2
    assert "prefix adapter" in capsys.readouterr().err


def test_a_merged_folder_of_an_earlier_version_still_loads(tmp_path, backbones, capsys):
    """The LoRA baseline's final folder as spt-embed wrote it before it saved adapters only: backbone/ (merged),
    trained_from set, and nothing recorded about the LoRA."""
    lora = lora_baseline_encoder(backbones["llama"], r=4, max_length=64, device="cpu")
    move_lora_b(lora, 0.5)
    expected = encode(lora)
    lora[0].merge_lora()
    old = tmp_path / "old"
    lora.save(str(old))
    config_path = old / BASELINE_CONFIG_NAME
    saved = json.loads(config_path.read_text())
    del saved["merged_lora"]  # what those versions wrote
    config_path.write_text(json.dumps(saved))
    assert (old / BACKBONE_SUBDIR / "config.json").is_file() and not (old / LORA_SUBDIR).exists()

    for reloaded in (
        spt_embed.load(old),
        SentenceTransformer(str(old), trust_remote_code=True, device="cpu"),
        load_model(resolve_model(old), device="cpu"),
    ):
        assert reloaded[0].peft_kind is None and reloaded[0].trained_from is not None
        assert (encode(reloaded) - expected).abs().max().item() <= 1e-5
    rows = info(capsys, old)
    assert rows["method"] == "lora (merged into the backbone's weights)"
    assert rows["trained parameters"] == "merged: the attention projections changed (not countable apart)"
    assert "LoRA" not in rows and "trained share" not in rows


def test_lora_resume_matches_uninterrupted_run(tmp_path, backbones):
    common = dict(method="lora", lr=1e-2, max_steps=8, lora_r=4, lora_targets=["q_proj", "v_proj"])
    straight = spt_embed.train(config(tmp_path / "a", backbones["llama"], **common))
    killed = config(tmp_path / "b", backbones["llama"], **common)
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(killed, callbacks=[Kill(5)])
    assert latest_checkpoint(tmp_path / "b" / "run", checkpoint_weights(Method.LORA)).name == "checkpoint-4"
    with pytest.raises(ValueError, match="--method lora"):
        spt_embed.train(config(tmp_path / "b", backbones["llama"]), resume=True)  # an spt run over lora checkpoints
    # A merged copy that an earlier spt-embed saved into the run folder goes once the run saves its adapter.
    stale = tmp_path / "b" / "run" / BACKBONE_SUBDIR
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    resumed = spt_embed.train(killed, resume=True)
    assert not stale.exists() and (tmp_path / "b" / "run" / LORA_WEIGHTS).is_file()
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


def test_the_methods_names_stay_importable_from_baselines():
    """lora.py's and prefix.py's public names, as train/bench_step.py and older code import them."""
    from spt_embed.model import baselines, lora, prefix

    for module, names in [
        (lora, ("LORA_WEIGHTS", "lora_baseline_encoder", "merge_lora_for_inference", "merge_lora_folder")),
        (prefix, ("PREFIX_WEIGHTS", "prefix_baseline_encoder")),
    ]:
        for name in names:
            assert getattr(baselines, name) is getattr(module, name), name


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
