"""method='deep-suffix' with deep_offsets='kv': the per-layer offsets act on the keys and values each layer's
attention computes at the K soft positions (the P-tuning v2 form), on tiny random Llama, Qwen2 and Mistral
backbones."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed import ForwardPath, SuffixPromptEncoder
from spt_embed.cli.main import main
from spt_embed.model.config import CONFIG_NAME, KV_OFFSETS_KEY, WEIGHTS_NAME, DeepOffsets
from spt_embed.model.deep_suffix import DeepSuffixModule, decoder_layers, key_value_projections
from spt_embed.model.identity import model_fingerprint
from spt_embed.training.train_config import TrainConfig

from .conftest import SENTENCES, make_backbone
from .test_deep_suffix import contrastive_loss, deep, encode
from .test_readout_template import ANCHORS, POSITIVES, assert_fast_path_equals_full
from .test_train import config as train_config

K = 4


def kv(backbone_dir, *, perturb=True, **kwargs):
    """A deep suffix with key/value offsets, soft tokens and offsets moved from their start as after training."""
    model = SuffixPromptEncoder.from_backbone(
        backbone_dir, num_tokens=kwargs.pop("num_tokens", K), method="deep-suffix", deep_offsets="kv", device="cpu",
        **kwargs,
    )
    if perturb:
        module = model.prompt_module
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            module.soft_prompt.add_(torch.randn(module.soft_prompt.shape, generator=generator) * 0.5)
            module.kv_offsets.add_(torch.randn(module.kv_offsets.shape, generator=generator) * 0.5)
    return model


def kv_width(module) -> int:
    config = module.backbone.config
    return config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)


def test_parameters_are_the_soft_tokens_and_the_key_value_offsets(backbone_dir):
    module = kv(backbone_dir, perturb=False).prompt_module
    assert isinstance(module, DeepSuffixModule) and module.spt_config.deep_offsets is DeepOffsets.KV
    layers, hidden = module.backbone.config.num_hidden_layers, module.backbone.config.hidden_size
    assert module.kv_offsets.shape == (layers, 2, K, kv_width(module))
    trainable = {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"soft_prompt": K * hidden, "kv_offsets": layers * 2 * K * kv_width(module)}
    assert not hasattr(module, "layer_offsets")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hooks_sit_on_each_layers_key_and_value_projections(tmp_path, arch):
    backbone = make_backbone(tmp_path / arch, arch)
    module = kv(backbone).prompt_module
    for layer in decoder_layers(module.backbone):
        assert not layer._forward_hooks  # the layer's output is left alone
        assert all(len(projection._forward_hooks) == 1 for projection in key_value_projections(layer))
    shallow = SuffixPromptEncoder.from_backbone(backbone, num_tokens=K, device="cpu")
    with torch.no_grad():
        shallow.prompt_module.soft_prompt.copy_(module.soft_prompt)
    assert not torch.allclose(encode(kv(backbone)), encode(shallow), atol=1e-3)  # the offsets act


@pytest.mark.parametrize("path", [ForwardPath.FULL, ForwardPath.FAST])
def test_zero_offsets_equal_the_shallow_suffix_exactly(backbone_dir, path):
    shallow = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=K, device="cpu")
    model = kv(backbone_dir, perturb=False)
    assert not model.prompt_module.kv_offsets.any()
    assert torch.equal(encode(model), encode(shallow))
    embeddings = []
    for encoder in (shallow, model):  # the training-time forward, with gradients
        module = encoder.prompt_module
        module.forward_path = path
        embeddings.append(module(module.preprocess(SENTENCES))["sentence_embedding"])
    assert torch.equal(*embeddings)


def test_offsets_leave_the_text_states_alone(backbone_dir):
    module = kv(backbone_dir).prompt_module
    shallow = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=K, device="cpu").prompt_module
    with torch.no_grad():
        shallow.soft_prompt.copy_(module.soft_prompt)
        features = module.preprocess(SENTENCES)
        outputs = []
        for m in (module, shallow):
            with m.soft_scope():
                outputs.append(m._full_forward(features["input_ids"], features["attention_mask"],
                                               output_hidden_states=True))
    for kv_states, shallow_states in zip(outputs[0].hidden_states, outputs[1].hidden_states):
        assert torch.equal(kv_states[:, :-K], shallow_states[:, :-K])
    assert not torch.allclose(outputs[0].last_hidden_state[:, -K:], outputs[1].last_hidden_state[:, -K:])


@pytest.mark.parametrize("readout", ["last", "soft-mean"])
@pytest.mark.parametrize("pack_tokens", [7, 1024])
def test_fast_path_equals_full_pass(backbone_dir, pack_tokens, readout):
    module = kv(backbone_dir, num_tokens=5, init="random", readout=readout).prompt_module
    module.pack_tokens = pack_tokens
    assert {"soft_prompt", "kv_offsets"} <= {name for name, p in module.named_parameters() if p.requires_grad}
    assert_fast_path_equals_full(module, lambda: contrastive_loss(module, ANCHORS, POSITIVES))


def test_text_alone_equals_text_in_mixed_batch(backbone_dir):
    model = kv(backbone_dir)
    batch = encode(model, SENTENCES, batch_size=len(SENTENCES))
    for index, text in enumerate(SENTENCES):
        assert torch.allclose(encode(model, [text])[0], batch[index], atol=1e-5), text
    assert len({tuple(row.tolist()) for row in batch}) == len(SENTENCES)


def test_survives_save_and_load(backbone_dir, tmp_path):
    model = kv(backbone_dir)
    out = tmp_path / "adapter"
    model.save(str(out))
    assert json.loads((out / CONFIG_NAME).read_text())["deep_offsets"] == "kv"
    assert set(load_file(str(out / WEIGHTS_NAME))) == {"soft_prompt", KV_OFFSETS_KEY}
    expected = encode(model)
    for loaded in (spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu")):
        assert loaded[0].spt_config.deep_offsets is DeepOffsets.KV
        assert torch.equal(encode(loaded), expected)


def test_training_moves_only_soft_tokens_and_key_value_offsets(tmp_path, backbones):
    cfg = train_config(tmp_path, backbones["llama"], method="deep-suffix", deep_offsets="kv", max_steps=4,
                       save_steps=2)
    model = spt_embed.train(cfg)
    module = model.prompt_module
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.kv_offsets", "0.soft_prompt"]
    assert module.kv_offsets.abs().sum() > 0  # they trained, from zero
    out = tmp_path / "run"
    assert json.loads((out / "train_config.json").read_text())["deep_offsets"] == "kv"
    assert torch.equal(encode(spt_embed.load(out)), encode(model))


def test_the_option_belongs_to_the_deep_suffix(backbone_dir, tmp_path):
    with pytest.raises(ValueError, match="deep_offsets='kv' is an option of method='deep-suffix'"):
        SuffixPromptEncoder.from_backbone(backbone_dir, deep_offsets="kv")
    with pytest.raises(ValueError, match="deep_offsets='kv' is an option of method deep-suffix, not 'lora'"):
        TrainConfig(output=str(tmp_path / "x"), method="lora", deep_offsets="kv")
    with pytest.raises(ValueError, match="deep_offsets='rows' is not supported; choose one of 'states', 'kv'"):
        SuffixPromptEncoder.from_backbone(backbone_dir, method="deep-suffix", deep_offsets="rows")


def test_fingerprint_tells_the_two_forms_apart(backbone_dir):
    states, keys_values = deep(backbone_dir, perturb=False), kv(backbone_dir, perturb=False)
    assert torch.equal(encode(states), encode(keys_values))  # both at zero: the same embeddings ...
    assert model_fingerprint(states)[0] != model_fingerprint(keys_values)[0]  # ... but not the same adapter


def test_info_shows_where_the_offsets_act(backbone_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    kv(backbone_dir).save(str(out))
    main(["info", str(out)])
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert rows["method"] == "deep-suffix"
    assert rows["deep offsets"].startswith("kv ")
    module = kv(backbone_dir).prompt_module
    layers, hidden = module.backbone.config.num_hidden_layers, module.backbone.config.hidden_size
    assert rows["trainable parameters"] == f"{K * hidden + layers * 2 * K * kv_width(module):,}"
