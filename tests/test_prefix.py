"""method=prefix (prefix tuning through peft, on the PromptEOL baseline) on tiny models: only the prefix trains
and the loss falls; a text alone encodes as inside a mixed-length batch; the real-activation init is the
backbone's own keys/values; save -> load (spt_embed.load, sentence-transformers with trust_remote_code, resume);
`info` counts the trained parameters; `export` refuses with the reason."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed.cli.main import main
from spt_embed.model.baselines import baseline_encoder
from spt_embed.model.prefix import PREFIX_SUBDIR, prefix_baseline_encoder
from spt_embed.recipe import latest_checkpoint
from spt_embed.training.train import checkpoint_weights
from spt_embed.training.train_config import Method
from tests.conftest import SENTENCES, Kill, make_backbone
from tests.test_lora_baseline import Snapshot, mean_loss
from tests.test_train import config


def encode(model, texts=SENTENCES):
    return model.encode(texts, convert_to_tensor=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_text_alone_encodes_as_in_a_mixed_length_batch(tmp_path, arch):
    backbone = make_backbone(tmp_path / arch, arch)
    model = prefix_baseline_encoder(backbone, num_tokens=3, init_text="hello world", device="cpu")
    batch = encode(model)
    alone = torch.stack([encode(model, [text])[0] for text in SENTENCES])
    assert (batch - alone).abs().max().item() <= 1e-5
    plain = baseline_encoder(backbone, "prompteol", device="cpu")
    assert (batch - encode(plain)).abs().max().item() > 1e-3  # the prefix changes the text's states


def test_text_init_reads_like_the_init_text_before_the_template(backbones):
    """Initialised from a text's own keys/values (the real-activation init), an untrained prefix encodes X exactly
    as the plain backbone reads the init text's tokens followed by the templated X: positions continue after it."""
    model = prefix_baseline_encoder(backbones["llama"], num_tokens=4, init_text="hello world", device="cpu")
    module = model[0]
    init = module.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    init = (init * 4)[:4]  # tiled to K
    base = module.backbone.get_base_model()
    for text in SENTENCES:
        ids = module.preprocess([text])["input_ids"][0].tolist()
        with torch.no_grad():
            hidden = base(input_ids=torch.tensor([init + ids])).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(hidden, dim=0)
        assert (encode(model, [text])[0] - expected).abs().max().item() <= 1e-5


def test_prefix_trains_only_the_prefix_saves_and_reloads(tmp_path, backbones, capsys):
    cfg = config(tmp_path, backbones["llama"], method="prefix", lr=1e-1, max_steps=8, save_steps=4)
    before = prefix_baseline_encoder(
        backbones["llama"], num_tokens=4, init_text='" means in one word:"', max_length=128, seed=cfg.seed, device="cpu"
    )
    snapshot = Snapshot()
    model = spt_embed.train(cfg, callbacks=[snapshot])

    assert snapshot.trainable and all("prompt_encoder" in name for name in snapshot.trainable)
    after = model[0].backbone.get_base_model().state_dict()
    for key, value in before[0].backbone.get_base_model().state_dict().items():
        assert torch.equal(value, after[key]), key
    trained = model[0].backbone.prompt_encoder.default.embedding.weight
    assert not torch.equal(trained, before[0].backbone.prompt_encoder.default.embedding.weight)
    assert mean_loss(model, tmp_path / "pairs.jsonl") < mean_loss(before, tmp_path / "pairs.jsonl") - 0.05

    out = tmp_path / "run"
    assert (out / PREFIX_SUBDIR / "adapter_model.safetensors").is_file()  # adapter only: no backbone copy
    assert not (out / "backbone").exists()
    assert json.loads((out / "train_config.json").read_text())["method"] == "prefix"
    assert json.loads((out / "modules.json").read_text())[0]["type"] == "spt_embed.model.baselines.BaselineModule"
    expected = encode(model)
    for reloaded in (spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu")):
        assert reloaded[0].peft_kind == "prefix"
        assert (encode(reloaded) - expected).abs().max().item() <= 1e-5
    assert latest_checkpoint(out, checkpoint_weights(Method.PREFIX)) is not None

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    trained = 4 * 2 * 2 * 16  # K x layers x (key, value) x kv_heads * head_dim
    assert "prefix" in info and f"{trained:,}" in info
    assert main(["export", str(out), str(tmp_path / "exported")]) == 2
    assert "Method 'prefix' cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "exported").exists()


def test_prefix_resume_matches_uninterrupted_run(tmp_path, backbones):
    common = dict(method="prefix", lr=1e-2, max_steps=8)
    straight = spt_embed.train(config(tmp_path / "a", backbones["qwen2"], **common))
    killed = config(tmp_path / "b", backbones["qwen2"], **common)
    with pytest.raises(KeyboardInterrupt):
        spt_embed.train(killed, callbacks=[Kill(5)])
    assert latest_checkpoint(tmp_path / "b" / "run", checkpoint_weights(Method.PREFIX)).name == "checkpoint-4"
    resumed = spt_embed.train(killed, resume=True)
    assert (encode(straight) - encode(resumed)).abs().max().item() <= 1e-5


def test_prefix_refuses_vocab_init(tmp_path, backbones):
    with pytest.raises(ValueError, match="method=prefix supports init text"):
        spt_embed.train(config(tmp_path, backbones["llama"], method="prefix", init="vocab"))
    assert not (tmp_path / "run").exists()  # refused before a run folder is made
