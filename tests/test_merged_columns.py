"""sentence-transformers' losses join a triplet's positive and negative columns into one forward pass and pad the
narrower column on the right; every module reads left-padded rows. These tests pin down that a joined batch gives
the same embeddings, loss and gradients as one forward per column (with the narrower column padded on the right,
the fast path used to read pads instead of text)."""

import types

import pytest
import torch
from sentence_transformers.base.losses.merged_forward import column_merging_disabled, merge_feature_batches
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from spt_embed import ForwardPath, SuffixPromptEncoder
from spt_embed.model.lora import lora_baseline_encoder
from spt_embed.model.soft_prompt import left_align
from tests.conftest import move_lora_b

ANCHORS = ["a man is playing a flute .", "hello", "the cat sleeps", "a dog runs"]
POSITIVES = ["a man plays", "hello world", "the small red cat sleeps on the big blue house", "the dog runs quickly"]
NEGATIVES = ["the woman eats food in the park , the child runs quickly .", "a cat", "a dog", "the house is big"]


def test_left_align_moves_right_padding_to_the_left():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 4], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    aligned_ids, aligned_mask = left_align(ids, mask)
    assert aligned_ids.tolist() == [[0, 0, 5, 6, 7], [0, 0, 8, 9, 4], [0, 0, 0, 0, 0]]
    assert aligned_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    left = (aligned_ids, aligned_mask)
    assert all(a is b for a, b in zip(left_align(*left), left))  # left-padded input: returned as it is


def test_merge_pads_on_the_right(backbones):
    """The premise of the fix: if sentence-transformers ever pads on the left, this test says so."""
    module = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu").prompt_module
    merged = merge_feature_batches([module.preprocess(POSITIVES), module.preprocess(NEGATIVES)])
    assert merged is not None
    assert not bool(merged["attention_mask"][:, -1].all())  # the narrower column's rows end in pads


def _models(backbone_dir):
    spt = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=4, init="random", device="cpu")
    deep = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=4, method="deep-suffix", device="cpu")
    with torch.no_grad():
        deep.prompt_module.layer_offsets.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    lora = lora_baseline_encoder(str(backbone_dir), r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], seed=0,
                                 device="cpu")
    move_lora_b(lora, 0.05, torch.Generator().manual_seed(1))  # B at zero leaves A without a gradient
    return {"suffix": spt, "deep-suffix": deep, "lora": lora}


@pytest.mark.parametrize("kind", ["suffix", "deep-suffix", "lora"])
def test_joined_columns_equal_separate_forwards(backbone_dir, kind):
    model = _models(backbone_dir)[kind]
    model.train()
    if kind != "lora":
        model[0].forward_path = ForwardPath.FAST  # the path training takes, and the one that misread the pads
    loss_fn = MultipleNegativesRankingLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for joined in (True, False):
        features = [model.preprocess(texts) for texts in (ANCHORS, POSITIVES, NEGATIVES)]
        model.zero_grad()
        if joined:
            loss = loss_fn(features, None)
        else:
            with column_merging_disabled():
                loss = loss_fn(features, None)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in params]))
    (joined_loss, joined_grads), (separate_loss, separate_grads) = results
    assert joined_loss == pytest.approx(separate_loss, abs=1e-5)
    for joined_grad, separate_grad in zip(joined_grads, separate_grads):
        assert separate_grad.abs().sum() > 0
        # float32: the joined batch runs other kernel shapes; the bug this guards against gave errors near 1.
        assert ((joined_grad - separate_grad).norm() / separate_grad.norm()).item() <= 1e-3


def _loss_and_grads(model, loss_fn, columns, separate: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    features = [model.preprocess(texts) for texts in columns]
    if separate:
        with column_merging_disabled():
            loss = loss_fn(features, None)
    else:
        loss = loss_fn(features, None)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", ["suffix", "deep-suffix"])
@pytest.mark.parametrize("columns", [2, 3], ids=["pairs", "triplets"])
def test_merged_anchor_loss_equals_separate_forwards(backbone_dir, kind, columns):
    """The training loss on the fast path embeds the anchors in the candidates' forward pass; loss and gradients stay
    those of one forward per column."""
    from spt_embed.training.losses import MergedColumnsMNRL

    model = _models(backbone_dir)[kind]
    model.train()
    texts = (ANCHORS, POSITIVES, NEGATIVES)[:columns]
    loss_fn = MergedColumnsMNRL(model)
    calls = []
    hook = model[0].register_forward_pre_hook(lambda module, args: calls.append(args[0]["input_ids"].shape[0]))
    merged_loss, merged_grads = _loss_and_grads(model, loss_fn, texts, separate=False)
    hook.remove()
    assert calls == [len(ANCHORS) * columns]  # one forward over every column
    separate_loss, separate_grads = _loss_and_grads(model, loss_fn, texts, separate=True)
    assert merged_loss == pytest.approx(separate_loss, abs=1e-5)
    for merged_grad, separate_grad in zip(merged_grads, separate_grads):
        assert separate_grad.abs().sum() > 0
        assert ((merged_grad - separate_grad).norm() / separate_grad.norm()).item() <= 1e-3


def test_merged_anchor_only_where_the_fast_path_runs(backbones):
    """A full pass pads the merged rows to the widest column (sentence-transformers keeps the anchor apart for that
    reason), and a query column with document columns goes through two prompts: both keep the parent's forward."""
    from spt_embed.training.losses import merges_all_columns

    model = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu",
                                              tasks=["query", "document"])
    model.train()
    features = [model.preprocess(texts) for texts in (ANCHORS, POSITIVES)]
    assert merges_all_columns(model, features)
    model[0].forward_path = ForwardPath.FULL
    assert not merges_all_columns(model, features)
    model[0].forward_path = ForwardPath.AUTO
    model[0].recompute_mlp = True  # memory first: the merged step's peak is higher
    assert not merges_all_columns(model, features)
    model[0].recompute_mlp = False
    routed = [dict(features[0], task="query"), dict(features[1], task="document")]
    assert not merges_all_columns(model, routed)
    assert merges_all_columns(model, [dict(f, task="document") for f in features])
    with torch.no_grad():  # no gradient: the full pass, nothing to merge for
        assert not merges_all_columns(model, features)
    # Distributed training hands the loss the model inside DistributedDataParallel (`.module`).
    assert merges_all_columns(types.SimpleNamespace(module=model), features)
    assert not merges_all_columns(torch.nn.Linear(2, 2), features)
    lora = _models(backbones["llama"])["lora"]
    assert not merges_all_columns(lora, [lora.preprocess(texts) for texts in (ANCHORS, POSITIVES)])


def test_training_loss_merges_anchor_columns(backbones, tmp_path):
    from spt_embed.training.losses import MergedColumnsMNRL
    from spt_embed.training.train import build_loss
    from spt_embed.training.train_config import TrainConfig

    model = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")
    assert type(build_loss(model, TrainConfig(output=str(tmp_path)))) is MergedColumnsMNRL
    assert type(build_loss(model, TrainConfig(output=str(tmp_path), cached=True))) is not MergedColumnsMNRL
