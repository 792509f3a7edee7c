"""The encoder's forward behaviour on tiny random Llama and Qwen2 backbones."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spt_embed
from spt_embed import ForwardPath, SuffixPromptEncoder

from .conftest import SENTENCES


def make(backbone_dir, **kwargs):
    return SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=kwargs.pop("num_tokens", 4), device="cpu", **kwargs)


def features(model, texts):
    return model.prompt_module.preprocess(texts)


def test_text_alone_equals_text_in_mixed_batch(backbone_dir):
    model = make(backbone_dir)
    batch = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_tensor=True)
    for index, text in enumerate(SENTENCES):
        alone = model.encode([text], convert_to_tensor=True)[0]
        assert torch.allclose(alone, batch[index], atol=1e-5), (text, (alone - batch[index]).abs().max())


def test_embeddings_are_unit_norm_and_finite(backbone_dir):
    emb = make(backbone_dir).encode(SENTENCES)
    assert emb.shape == (4, 32)
    assert np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_normalize_false_keeps_raw_hidden_state(backbone_dir):
    raw = make(backbone_dir, normalize=False).encode(SENTENCES, convert_to_tensor=True)
    unit = make(backbone_dir).encode(SENTENCES, convert_to_tensor=True)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4))
    assert torch.allclose(F.normalize(raw, dim=-1), unit, atol=1e-6)


def test_empty_string_is_the_soft_prompt_alone(backbone_dir, caplog):
    model = make(backbone_dir)
    emb = model.encode(["", SENTENCES[0], ""], convert_to_tensor=True)
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb[0], emb[2], atol=1e-6)
    alone = model.encode([""], convert_to_tensor=True)[0]
    assert torch.allclose(alone, emb[0], atol=1e-5)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert "empty text" in caplog.text


def test_truncation_cuts_text_never_soft_tokens(backbone_dir):
    model = make(backbone_dir, max_length=10)  # 6 text tokens + 4 soft tokens
    long_text = " ".join(["the big dog runs"] * 10)
    feats = features(model, [long_text])
    assert feats["input_ids"].shape[1] == 6
    tokenizer = model.prompt_module.tokenizer
    kept = tokenizer.decode(feats["input_ids"][0], skip_special_tokens=True)
    assert torch.allclose(
        model.encode([long_text], convert_to_tensor=True), model.encode([kept], convert_to_tensor=True), atol=1e-5
    )
    with pytest.raises(ValueError, match="must exceed the 4 soft tokens"):
        model.max_seq_length = 4


def test_prompt_is_prepended(backbone_dir):
    model = make(backbone_dir)
    with_prompt = model.encode(["cat sleeps"], prompt="hello world ", convert_to_tensor=True)
    joined = model.encode(["hello world cat sleeps"], convert_to_tensor=True)
    assert torch.allclose(with_prompt, joined, atol=1e-6)


def test_non_string_input_is_rejected(backbone_dir):
    with pytest.raises(TypeError, match="Input 1 is int, expected str"):
        features(make(backbone_dir), ["fine", 3])


def contrastive_loss(model, path):
    """InfoNCE over 4 anchors vs 4 positives, through the given forward path."""
    module = model.prompt_module
    module.forward_path = path
    anchors = module(features(model, SENTENCES))["sentence_embedding"]
    positives = module(features(model, [s[::-1] for s in SENTENCES]))["sentence_embedding"]
    scores = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / 0.05
    return F.cross_entropy(scores, torch.arange(len(SENTENCES)))


@pytest.mark.parametrize("recompute_mlp", [False, True], ids=["", "recompute-mlp"])
@pytest.mark.parametrize("pack_tokens", [1, 7, 1024])
@pytest.mark.parametrize("texts", [SENTENCES, ["", *SENTENCES[1:]], ["", ""]], ids=["texts", "with-empty", "empty"])
def test_fast_path_equals_full_pass(backbone_dir, texts, pack_tokens, recompute_mlp):
    model = make(backbone_dir, num_tokens=5, init="random")
    module = model.prompt_module
    module.pack_tokens = pack_tokens  # 1: one text per row; 7: several texts share a row; 1024: all in one row
    module.recompute_mlp = recompute_mlp  # acts on the fast path only
    grads, losses, embs = {}, {}, {}
    for path in (ForwardPath.FULL, ForwardPath.FAST):
        module.soft_prompt.grad = None
        module.forward_path = path
        embs[path] = module(features(model, texts))["sentence_embedding"]
        loss = contrastive_loss(model, path)
        loss.backward()
        losses[path], grads[path] = loss.item(), module.soft_prompt.grad.clone()
    assert torch.allclose(embs[ForwardPath.FULL], embs[ForwardPath.FAST], atol=1e-5)
    assert abs(losses[ForwardPath.FULL] - losses[ForwardPath.FAST]) <= 1e-6 * max(1.0, losses[ForwardPath.FULL])
    full, fast = grads[ForwardPath.FULL], grads[ForwardPath.FAST]
    assert full.abs().sum() > 0
    assert ((full - fast).norm() / full.norm()).item() <= 1e-4


def test_auto_path_choice(backbone_dir, monkeypatch):
    module = make(backbone_dir).prompt_module
    assert module.resolve_path(3) is ForwardPath.FAST  # causal + suffix + gradients
    assert module.resolve_path(0) is ForwardPath.FULL  # all texts empty: nothing to cache
    with torch.no_grad():
        assert module.resolve_path(3) is ForwardPath.FULL  # inference: one pass is cheaper
    monkeypatch.setattr(module.backbone.config, "is_causal", False, raising=False)
    assert module.resolve_path(3) is ForwardPath.FULL  # bidirectional: text states depend on the suffix
    module.forward_path = ForwardPath.FAST
    with pytest.raises(ValueError, match="fast path needs a causal backbone"):
        module.resolve_path(3)


def test_prefix_placement_uses_full_pass(backbone_dir):
    model = make(backbone_dir, placement="prefix")
    module = model.prompt_module
    assert module.resolve_path(3) is ForwardPath.FULL
    module.forward_path = ForwardPath.FAST
    with pytest.raises(ValueError, match="suffix placement"):
        module.resolve_path(3)
    module.forward_path = ForwardPath.AUTO
    emb = model.encode(SENTENCES, convert_to_tensor=True)
    alone = model.encode([SENTENCES[2]], convert_to_tensor=True)[0]
    assert torch.allclose(emb[2], alone, atol=1e-5)


def test_only_soft_tokens_train(backbone_dir):
    model = make(backbone_dir, init="vocab")
    module = model.prompt_module
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.soft_prompt"]
    before = {name: p.detach().clone() for name, p in module.backbone.named_parameters()}
    soft_before = module.soft_prompt.detach().clone()
    model.train()
    assert not module.backbone.training  # frozen backbone stays in eval mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss = contrastive_loss(model, ForwardPath.AUTO)
    loss.backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    optimizer.step()
    for name, p in module.backbone.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not torch.equal(module.soft_prompt, soft_before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tokens": 0}, "num_tokens must be an integer >= 1"),
        ({"init": "nope"}, "init='nope' is not supported"),
        ({"placement": "inside"}, "placement='inside' is not supported"),
    ],
)
def test_bad_construction_arguments(backbone_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SuffixPromptEncoder.from_backbone(backbone_dir, **kwargs)


def test_similarity_and_public_api(backbone_dir):
    model = make(backbone_dir)
    emb = model.encode(SENTENCES[:2])
    sim = model.similarity(emb, emb)
    assert sim.shape == (2, 2) and torch.allclose(sim.diagonal(), torch.ones(2), atol=1e-5)
    assert isinstance(model, spt_embed.SuffixPromptEncoder)
    assert model.get_embedding_dimension() == 32
