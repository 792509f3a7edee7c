"""method='deep-suffix': the K soft tokens plus a trained offset to their states after every decoder layer, on tiny
random Llama, Qwen2 and Mistral backbones."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed import ForwardPath, SuffixPromptEncoder
from spt_embed.cli.main import main
from spt_embed.model.backbone import Backbone
from spt_embed.model.config import CONFIG_NAME, LAYER_OFFSETS_KEY, WEIGHTS_NAME, AdapterMethod
from spt_embed.model.deep_suffix import DeepSuffixModule, decoder_layers
from spt_embed.model.identity import model_fingerprint
from spt_embed.model.module import SuffixPromptModule

from .conftest import SENTENCES, make_backbone
from .test_readout_template import ANCHORS, POSITIVES, assert_fast_path_equals_full
from .test_train import config as train_config

K = 4


def deep(backbone_dir, *, perturb=True, **kwargs):
    """A deep-suffix encoder whose soft tokens and offsets differ from their start, as after training."""
    model = SuffixPromptEncoder.from_backbone(
        backbone_dir, num_tokens=kwargs.pop("num_tokens", K), method="deep-suffix", device="cpu", **kwargs
    )
    if perturb:
        module = model.prompt_module
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            module.soft_prompt.add_(torch.randn(module.soft_prompt.shape, generator=generator) * 0.5)
            module.layer_offsets.add_(torch.randn(module.layer_offsets.shape, generator=generator) * 0.5)
    return model


def encode(model, texts=SENTENCES, **kwargs):
    return model.encode(texts, convert_to_tensor=True, **kwargs)


def test_module_and_parameters(backbone_dir):
    model = deep(backbone_dir, perturb=False)
    module = model.prompt_module
    assert isinstance(DeepSuffixModule.from_backbone(backbone_dir), DeepSuffixModule)  # the class names the method
    shallow = SuffixPromptModule.from_backbone(backbone_dir)
    assert type(shallow) is SuffixPromptModule
    with pytest.raises(ValueError, match="DeepSuffixModule is the module of method 'deep-suffix'.*says 'suffix'"):
        DeepSuffixModule(Backbone(shallow.backbone, shallow.tokenizer, shallow.backbone_ref), shallow.spt_config)
    assert isinstance(module, DeepSuffixModule) and module.spt_config.method is AdapterMethod.DEEP_SUFFIX
    layers = module.backbone.config.num_hidden_layers
    hidden = module.backbone.config.hidden_size
    assert module.layer_offsets.shape == (layers, K, hidden)
    trainable = {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"soft_prompt": K * hidden, "layer_offsets": layers * K * hidden}  # K x H x (N + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hooks_find_the_decoder_layers(tmp_path, arch):
    backbone = make_backbone(tmp_path / arch, arch)
    module = deep(backbone).prompt_module
    layers = decoder_layers(module.backbone)
    assert layers is module.backbone.layers
    assert all(len(layer._forward_hooks) == 1 for layer in layers)
    shallow = SuffixPromptEncoder.from_backbone(backbone, num_tokens=K, device="cpu")
    with torch.no_grad():
        shallow.prompt_module.soft_prompt.copy_(module.soft_prompt)
    assert not torch.allclose(encode(deep(backbone)), encode(shallow), atol=1e-3)  # the offsets act


@pytest.mark.parametrize("path", [ForwardPath.FULL, ForwardPath.FAST])
def test_zero_offsets_equal_the_shallow_suffix_exactly(backbone_dir, path):
    shallow = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=K, device="cpu")
    deep_model = deep(backbone_dir, perturb=False)
    assert not deep_model.prompt_module.layer_offsets.any()
    assert torch.equal(encode(deep_model), encode(shallow))
    embeddings = []
    for model in (shallow, deep_model):  # the training-time forward, with gradients
        module = model.prompt_module
        module.forward_path = path
        embeddings.append(module(module.preprocess(SENTENCES))["sentence_embedding"])
    assert torch.equal(*embeddings)


def test_offsets_leave_the_text_states_alone(backbone_dir):
    model = deep(backbone_dir)
    module = model.prompt_module
    shallow = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=K, device="cpu").prompt_module
    with torch.no_grad():
        shallow.soft_prompt.copy_(module.soft_prompt)
        features = module.preprocess(SENTENCES)
        outputs = []
        for m in (module, shallow):
            with m.soft_scope():
                outputs.append(m._full_forward(features["input_ids"], features["attention_mask"],
                                               output_hidden_states=True))
    for deep_states, shallow_states in zip(outputs[0].hidden_states, outputs[1].hidden_states):
        assert torch.equal(deep_states[:, :-K], shallow_states[:, :-K])  # the text (and its padding)
    assert not torch.allclose(outputs[0].last_hidden_state[:, -K:], outputs[1].last_hidden_state[:, -K:])


def contrastive_loss(module, anchors, positives):
    a = module(module.preprocess(anchors))["sentence_embedding"]
    p = module(module.preprocess(positives))["sentence_embedding"]
    scores = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T / 0.05
    return F.cross_entropy(scores, torch.arange(len(anchors)))


@pytest.mark.parametrize("readout", ["last", "soft-mean", "layer-mix"])
@pytest.mark.parametrize("pack_tokens", [7, 1024])
def test_fast_path_equals_full_pass(backbone_dir, pack_tokens, readout):
    module = deep(backbone_dir, num_tokens=5, init="random", readout=readout).prompt_module
    module.pack_tokens = pack_tokens
    module.recompute_mlp = pack_tokens == 7  # the recomputed MLPs are exact too
    assert {"soft_prompt", "layer_offsets"} <= {name for name, p in module.named_parameters() if p.requires_grad}
    assert_fast_path_equals_full(module, lambda: contrastive_loss(module, ANCHORS, POSITIVES))


def test_text_alone_equals_text_in_mixed_batch(backbone_dir):
    model = deep(backbone_dir)
    batch = encode(model, SENTENCES, batch_size=len(SENTENCES))
    for index, text in enumerate(SENTENCES):
        assert torch.allclose(encode(model, [text])[0], batch[index], atol=1e-5), text
    assert len({tuple(row.tolist()) for row in batch}) == len(SENTENCES)


def test_training_moves_only_soft_tokens_and_offsets(tmp_path, backbones):
    cfg = train_config(tmp_path, backbones["llama"], method="deep-suffix", max_steps=6, save_steps=3)
    before = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=K, seed=3)
    backbone_before = {k: v.clone() for k, v in before.prompt_module.backbone.state_dict().items()}
    model = spt_embed.train(cfg)
    module = model.prompt_module
    assert isinstance(module, DeepSuffixModule)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.layer_offsets", "0.soft_prompt"]
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert module.layer_offsets.abs().sum() > 0  # they trained, from zero
    assert not torch.equal(module.soft_prompt, before.prompt_module.soft_prompt)
    out = tmp_path / "run"
    assert json.loads((out / CONFIG_NAME).read_text())["method"] == "deep-suffix"
    assert json.loads((out / "train_config.json").read_text())["method"] == "deep-suffix"
    reloaded = spt_embed.load(out)
    assert torch.equal(reloaded.prompt_module.layer_offsets, module.layer_offsets)
    assert torch.equal(encode(reloaded), encode(model))


def test_survives_save_and_load(backbone_dir, tmp_path):
    model = deep(backbone_dir)
    out = tmp_path / "adapter"
    model.save(str(out))
    assert json.loads((out / CONFIG_NAME).read_text())["method"] == "deep-suffix"
    assert set(load_file(str(out / WEIGHTS_NAME))) == {"soft_prompt", LAYER_OFFSETS_KEY}
    modules = json.loads((out / "modules.json").read_text())
    assert modules[0]["type"] == "spt_embed.model.deep_suffix.DeepSuffixModule"
    expected = encode(model)
    for loaded in (spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu"),
                   SentenceTransformer(modules=[SuffixPromptModule.load(str(out)), model[1]], device="cpu")):
        assert isinstance(loaded[0], DeepSuffixModule)  # the config's method decides, whichever class loads it
        assert torch.equal(encode(loaded), expected)


def test_weights_without_offsets_are_refused(backbone_dir, tmp_path):
    out = tmp_path / "adapter"
    deep(backbone_dir).save(str(out))
    tensors = load_file(str(out / WEIGHTS_NAME))
    del tensors[LAYER_OFFSETS_KEY]
    save_file(tensors, str(out / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"method='deep-suffix'.*needs \['layer_offsets', 'soft_prompt'\].*inconsistent"):
        spt_embed.load(out)


def test_offsets_of_another_shape_are_refused(backbone_dir, tmp_path):
    out = tmp_path / "adapter"
    deep(backbone_dir).save(str(out))
    tensors = load_file(str(out / WEIGHTS_NAME))
    tensors[LAYER_OFFSETS_KEY] = tensors[LAYER_OFFSETS_KEY][:1]
    save_file(tensors, str(out / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"offsets have shape \(1, 4, 32\), expected \(2, 4, 32\)"):
        spt_embed.load(out)


def test_prefix_placement_is_refused(backbone_dir):
    with pytest.raises(ValueError, match="deep-suffix.*placement='suffix'"):
        SuffixPromptEncoder.from_backbone(backbone_dir, method="deep-suffix", placement="prefix")


def test_export_refuses_deep_suffix(backbone_dir, tmp_path):
    out = tmp_path / "adapter"
    deep(backbone_dir).save(str(out))
    with pytest.raises(ValueError, match="Method 'deep-suffix' cannot be exported.*spt_embed.load"):
        spt_embed.export(out, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_fingerprint_covers_the_offsets(backbone_dir):
    model = deep(backbone_dir)
    shallow = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=K, device="cpu")
    with torch.no_grad():
        shallow.prompt_module.soft_prompt.copy_(model.prompt_module.soft_prompt)
    first = model_fingerprint(model)[0]
    assert first != model_fingerprint(shallow)[0]
    with torch.no_grad():
        model.prompt_module.layer_offsets[0, 0, 0] += 1
    assert model_fingerprint(model)[0] != first


def test_info_shows_method_and_trained_parameters(backbone_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    deep(backbone_dir).save(str(out))
    main(["info", str(out)])
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert rows["method"] == "deep-suffix"
    assert rows["trainable parameters"] == f"{K * 32 * 3:,}"  # K x hidden x (2 layers + the soft tokens)
