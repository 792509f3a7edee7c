"""The bidirectional switch on tiny Llama, Qwen2 and Mistral models: later tokens reach earlier positions, pads
stay masked, the flag survives save/load, and SPT falls back to the full pass."""

import json
import logging

import pytest
import torch
from transformers import AutoModel, GPT2Config, GPT2Model

from spt_embed.model.backbone import load_backbone
from spt_embed.model.bidirectional import SUPPORTED, is_bidirectional, make_bidirectional, verify_bidirectional
from spt_embed.model.module import ForwardPath, SuffixPromptModule
from tests.conftest import _config

ARCHS = ["llama", "qwen2", "mistral"]


def tiny(arch, attn="sdpa", seed=0):
    _, config = _config(arch, 32, 60)
    torch.manual_seed(seed)
    return AutoModel.from_config(config, attn_implementation=attn).eval()


def hidden(model, ids, mask=None):
    with torch.no_grad():
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state


def test_supported_set_is_covered():
    assert SUPPORTED == set(ARCHS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_later_token_reaches_position_zero_and_pads_change_nothing(arch, attn):
    model = tiny(arch, attn)
    first, second = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 9]])
    assert torch.equal(hidden(model, first)[0, 0], hidden(model, second)[0, 0])  # causal to start with
    assert not is_bidirectional(model.config)

    make_bidirectional(model)
    assert is_bidirectional(model.config)
    assert (hidden(model, first)[0, 0] - hidden(model, second)[0, 0]).abs().max() > 1e-4

    # Left padding with an attention mask: the short row's real tokens see the same thing batched or alone,
    # whatever ids the pads hold.
    short = torch.tensor([[10, 11, 12]])
    alone = hidden(model, short, torch.ones_like(short))[0]
    for pad in (0, 33):
        ids = torch.tensor([[20, 21, 22, 23, 24], [pad, pad, 10, 11, 12]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        batched = hidden(model, ids, mask)[1, 2:]
        assert (batched - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_switch_is_idempotent(arch):
    model = tiny(arch)
    ids = torch.tensor([[5, 6, 7, 8]])
    once = hidden(make_bidirectional(model), ids)
    twice = hidden(make_bidirectional(make_bidirectional(model)), ids)
    assert model.config.is_causal is False
    assert torch.equal(once, twice)


def test_unsupported_architecture_is_a_clear_error():
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=60, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'.*SUPPORTED"):
        make_bidirectional(model)
    assert getattr(model.config, "is_causal", True) is not False  # nothing changed


def test_probe_catches_a_model_that_ignores_the_flag():
    with pytest.raises(ValueError, match="had no effect"):
        verify_bidirectional(tiny("llama"))  # still causal: the probe must notice


def save_bidirectional(directory, backbone_dir):
    model = AutoModel.from_pretrained(backbone_dir)
    make_bidirectional(model).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (backbone_dir / name).is_file():
            (directory / name).write_bytes((backbone_dir / name).read_bytes())
    return directory


def test_saved_backbone_reloads_bidirectionally(tmp_path, backbone_dir):
    saved = save_bidirectional(tmp_path / "bi", backbone_dir)
    assert json.loads((saved / "config.json").read_text())["is_causal"] is False
    backbone = load_backbone(saved)
    assert backbone.ref.is_causal is False
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 9]])
    assert (hidden(backbone.model, a)[0, 0] - hidden(backbone.model, b)[0, 0]).abs().max() > 1e-4
    assert load_backbone(backbone_dir).ref.is_causal is True


def test_spt_on_bidirectional_backbone_uses_full_pass(tmp_path, backbones, caplog):
    saved = save_bidirectional(tmp_path / "bi", backbones["llama"])
    module = SuffixPromptModule.from_backbone(saved, num_tokens=2, max_length=32)
    assert not module.is_causal
    with caplog.at_level(logging.INFO, logger="spt_embed"):
        assert module.resolve_path(5) is ForwardPath.FULL
        features = module.preprocess(["a man plays", "hello"])
        module(features)["sentence_embedding"].sum().backward()
    assert "bidirectional" in caplog.text
    assert module.soft_prompt.grad is not None
    causal = SuffixPromptModule.from_backbone(backbones["llama"], num_tokens=2, max_length=32)
    assert causal.resolve_path(5) is ForwardPath.FAST


def test_export_of_a_bidirectional_adapter_stays_bidirectional(tmp_path, backbones):
    from sentence_transformers import SentenceTransformer

    import spt_embed

    saved = save_bidirectional(tmp_path / "bi", backbones["llama"])
    encoder = spt_embed.SuffixPromptEncoder.from_backbone(str(saved), num_tokens=2, max_length=32)
    encoder.save(str(tmp_path / "adapter"))
    spt_embed.export(str(tmp_path / "adapter"), str(tmp_path / "st"))
    plain = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert plain[0].auto_model.config.is_causal is False
    texts = ["a man plays the flute", "hello world"]
    diff = encoder.encode(texts, convert_to_tensor=True) - plain.encode(texts, convert_to_tensor=True)
    assert diff.abs().max().item() <= 1e-5
