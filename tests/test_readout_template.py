"""Readouts (last position, mean of the soft positions, a trained layer mix) and a hard text template around the
text plus the soft suffix, on tiny random Llama and Qwen2 backbones."""

import inspect
import json
import re

import mteb
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.data_collator import BaseDataCollator

import spt_embed
from spt_embed import ForwardPath, Readout, SuffixPromptEncoder
from spt_embed.cli.main import build_parser, main
from spt_embed.cli.options import config_from_args
from spt_embed.evaluation import evaluate as ev
from spt_embed.evaluation.mteb_tasks import get_tasks
from spt_embed.model.config import CONFIG_NAME, LAYER_WEIGHTS_KEY, WEIGHTS_NAME
from spt_embed.model.encoder import DEFAULT_PROMPT, compose_prompt, default_prompt, template_prompts
from spt_embed.model.module import SuffixPromptModule

from .conftest import SENTENCES
from .test_eval import TOPICS, ToyModule, data_root, one_hot_topic, perfect_sts  # noqa: F401 (data_root: a fixture)
from .test_train import config as train_config

READOUTS = [readout.value for readout in Readout]
# The PromptEOL head in the tiny word-level vocabulary; the trailing space keeps `"` a token of its own there.
TEMPLATE = 'the sentence : " '


def make(backbone_dir, readout="last", *, perturb=True, **kwargs):
    """An encoder whose soft tokens (with `perturb`) and layer-mix weights differ from their initialisation, as after
    training."""
    model = SuffixPromptEncoder.from_backbone(
        backbone_dir, num_tokens=kwargs.pop("num_tokens", 4), readout=readout, device="cpu", **kwargs
    )
    module = model.prompt_module
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if perturb:
            module.soft_prompt.add_(torch.randn(module.soft_prompt.shape, generator=generator) * 0.5)
        if module.layer_weights is not None:
            module.layer_weights.copy_(torch.rand(module.layer_weights.shape, generator=generator) + 0.1)
    return model


def encode(model, texts=SENTENCES, **kwargs):
    return model.encode(texts, convert_to_tensor=True, **kwargs)


def without_prompt(model, texts):
    """Embeddings of `template + text` with no prompt applied: an explicit empty prompt overrides the default."""
    return encode(model, [TEMPLATE + text for text in texts], prompt="")


# ---------------------------------------------------------------------------------------------------------------
# Training: a template plus a soft suffix trains only the soft tokens (and the layer weights)


@pytest.mark.parametrize("readout", READOUTS)
def test_template_training_moves_only_soft_tokens(tmp_path, backbones, readout, monkeypatch):
    collated_prompts = []  # the prompt of each preprocess call made by the trainer's data collator
    original = SuffixPromptModule.preprocess

    def spy(self, inputs, prompt=None, **kwargs):
        frame = inspect.currentframe()
        while frame is not None and not isinstance(frame.f_locals.get("self"), BaseDataCollator):
            frame = frame.f_back
        if frame is not None:
            collated_prompts.append(prompt)
        return original(self, inputs, prompt=prompt, **kwargs)

    monkeypatch.setattr(SuffixPromptModule, "preprocess", spy)
    cfg = train_config(tmp_path, backbones["llama"], readout=readout, prompt=TEMPLATE, max_steps=6, save_steps=6)
    before = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, seed=3, readout=readout)
    backbone_before = {k: v.clone() for k, v in before.prompt_module.backbone.state_dict().items()}
    model = spt_embed.train(cfg)
    module = model.prompt_module

    # the trainer's collator handed the template to the module with every column's texts
    assert len(collated_prompts) == 2 * 6 and set(collated_prompts) == {TEMPLATE}  # 2 columns, 6 steps
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    expected = ["0.layer_weights", "0.soft_prompt"] if readout == "layer-mix" else ["0.soft_prompt"]
    assert trainable == expected
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert not torch.equal(module.soft_prompt, before.prompt_module.soft_prompt)
    if readout == "layer-mix":
        assert not torch.equal(module.layer_weights, before.prompt_module.layer_weights)

    out = tmp_path / "run"
    assert json.loads((out / CONFIG_NAME).read_text())["readout"] == readout
    settings = json.loads((out / "config_sentence_transformers.json").read_text())
    assert settings["default_prompt_name"] == DEFAULT_PROMPT and settings["prompts"][DEFAULT_PROMPT] == TEMPLATE
    reloaded = spt_embed.load(out)
    assert default_prompt(reloaded) == TEMPLATE and reloaded.prompt_module.readout is Readout(readout)
    assert torch.equal(encode(reloaded), encode(model))
    assert torch.allclose(encode(reloaded), without_prompt(reloaded, SENTENCES), atol=1e-6)


def test_train_options_from_yaml_and_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('readout: layer-mix\nprompt: "This sentence : \\""\n')
    cfg = spt_embed.TrainConfig.from_sources(str(recipe), output="out")
    assert cfg.readout is Readout.LAYER_MIX and cfg.prompt == 'This sentence : "'
    assert cfg.to_dict()["readout"] == "layer-mix"
    with pytest.raises(ValueError, match="readout='middle' is not supported"):
        spt_embed.TrainConfig(readout="middle")
    with pytest.raises(ValueError, match="prompt is empty"):
        spt_embed.TrainConfig(prompt="")
    args = build_parser().parse_args(["train", "--output", "o", "--readout", "soft-mean", "--prompt", "X: "])
    cfg = config_from_args(args, spt_embed.TrainConfig)
    assert cfg.readout is Readout.SOFT_MEAN and cfg.prompt == "X: "


# ---------------------------------------------------------------------------------------------------------------
# Every readout: alone == in a mixed-length batch, fast path == full path


@pytest.mark.parametrize("prompt", [None, TEMPLATE], ids=["no-template", "template"])
@pytest.mark.parametrize("readout", READOUTS)
def test_text_alone_equals_text_in_mixed_batch(backbone_dir, readout, prompt):
    model = make(backbone_dir, readout, prompt=prompt)
    batch = encode(model, SENTENCES, batch_size=len(SENTENCES))
    for index, text in enumerate(SENTENCES):
        alone = encode(model, [text])[0]
        assert torch.allclose(alone, batch[index], atol=1e-5), (text, (alone - batch[index]).abs().max())
    assert len({tuple(row.tolist()) for row in batch}) == len(SENTENCES)  # the readout sees the text


def contrastive_loss(model, anchors, positives):
    module = model.prompt_module
    a = module(module.preprocess(anchors, prompt=TEMPLATE))["sentence_embedding"]
    p = module(module.preprocess(positives, prompt=TEMPLATE))["sentence_embedding"]
    scores = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T / 0.05
    return F.cross_entropy(scores, torch.arange(len(anchors)))


def assert_fast_path_equals_full(module, loss_fn) -> None:
    """The fast and the full path give the same embeddings, the same `loss_fn()` (to 1e-6) and the same gradient of
    every trainable parameter (relative error <= 1e-4; each gradient non-zero). It runs in float64: in float32 the
    two paths' different summation orders alone reached a relative error of 1.08e-4 on one CPU (AVX-512), where a
    real difference between the paths is orders of magnitude larger."""
    module.to(torch.float64)
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    losses, grads, embs = {}, {}, {}
    for path in (ForwardPath.FULL, ForwardPath.FAST):
        module.zero_grad()
        module.forward_path = path
        embs[path] = module(module.preprocess(SENTENCES))["sentence_embedding"]
        loss = loss_fn()
        loss.backward()
        losses[path] = loss.item()
        grads[path] = {name: p.grad.clone() for name, p in params.items()}
    assert torch.allclose(embs[ForwardPath.FULL], embs[ForwardPath.FAST], atol=1e-5)
    assert abs(losses[ForwardPath.FULL] - losses[ForwardPath.FAST]) <= 1e-6 * max(1.0, losses[ForwardPath.FULL])
    for name in params:
        full, fast = grads[ForwardPath.FULL][name], grads[ForwardPath.FAST][name]
        assert full.abs().sum() > 0, name
        assert ((full - fast).norm() / full.norm()).item() <= 1e-4, name


ANCHORS, POSITIVES = ["", *SENTENCES[1:]], [s[::-1] for s in SENTENCES]


@pytest.mark.parametrize("pack_tokens", [7, 1024])
@pytest.mark.parametrize("readout", READOUTS)
def test_fast_path_equals_full_pass(backbone_dir, readout, pack_tokens):
    model = make(backbone_dir, readout, num_tokens=5, init="random", perturb=False)
    module = model.prompt_module
    module.pack_tokens = pack_tokens
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert set(params) == ({"soft_prompt", "layer_weights"} if readout == "layer-mix" else {"soft_prompt"})
    assert_fast_path_equals_full(module, lambda: contrastive_loss(model, ANCHORS, POSITIVES))


@pytest.mark.parametrize("path", [ForwardPath.FULL, ForwardPath.FAST])
def test_layer_mix_at_init_equals_last_exactly(backbone_dir, path):
    last = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=4, device="cpu")
    mix = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=4, device="cpu", readout="layer-mix")
    weights = mix.prompt_module.layer_weights
    assert weights.shape == (mix.prompt_module.backbone.config.num_hidden_layers + 1,)
    assert weights.tolist() == [0.0] * (weights.shape[0] - 1) + [1.0]
    assert torch.equal(encode(mix), encode(last))
    embeddings = []
    for model in (last, mix):  # the training-time forward, with gradients (the fast path when asked)
        model.prompt_module.forward_path = path
        embeddings.append(model.prompt_module(model.prompt_module.preprocess(SENTENCES))["sentence_embedding"])
    assert torch.equal(*embeddings)


def test_soft_mean_is_the_mean_of_the_soft_positions(backbone_dir):
    model = make(backbone_dir, "soft-mean", normalize=False)
    module = model.prompt_module
    features = module.preprocess(SENTENCES[:2])
    with torch.no_grad():
        out = module._full_forward(features["input_ids"], features["attention_mask"], output_hidden_states=False)
        got = module(dict(features))["sentence_embedding"]
    assert torch.allclose(got, out.last_hidden_state[:, -4:].mean(dim=1), atol=1e-6)


def test_soft_mean_with_prefix_on_a_causal_backbone_is_refused(backbone_dir):
    with pytest.raises(ValueError, match="never see it"):
        SuffixPromptEncoder.from_backbone(backbone_dir, readout="soft-mean", placement="prefix")


# ---------------------------------------------------------------------------------------------------------------
# Persistence: every readout and the template survive save and load; export takes `last` only


@pytest.mark.parametrize("readout", READOUTS)
def test_readout_survives_save_and_load(backbone_dir, readout, tmp_path):
    model = make(backbone_dir, readout)
    out = tmp_path / "adapter"
    model.save(str(out))
    assert json.loads((out / CONFIG_NAME).read_text())["readout"] == readout
    tensors = load_file(str(out / WEIGHTS_NAME))
    assert (LAYER_WEIGHTS_KEY in tensors) == (readout == "layer-mix")
    expected = encode(model)
    for loaded in (spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu")):
        assert loaded[0].readout is Readout(readout)
        assert torch.equal(encode(loaded), expected)
        if readout == "layer-mix":
            assert torch.equal(loaded[0].layer_weights, model.prompt_module.layer_weights)


def test_folder_without_readout_loads_as_last(backbone_dir, tmp_path):
    model = make(backbone_dir)
    out = tmp_path / "adapter"
    model.save(str(out))
    config = json.loads((out / CONFIG_NAME).read_text())
    del config["readout"]  # as written before the field existed
    (out / CONFIG_NAME).write_text(json.dumps(config))
    loaded = spt_embed.load(out)
    assert loaded.prompt_module.readout is Readout.LAST
    assert torch.equal(encode(loaded), encode(model))


@pytest.mark.parametrize(("readout", "drop"), [("layer-mix", True), ("last", False)])
def test_weights_that_disagree_with_the_readout_are_refused(backbone_dir, tmp_path, readout, drop):
    out = tmp_path / "adapter"
    make(backbone_dir, readout).save(str(out))
    tensors = load_file(str(out / WEIGHTS_NAME))
    if drop:
        del tensors[LAYER_WEIGHTS_KEY]
    else:
        tensors[LAYER_WEIGHTS_KEY] = torch.ones(3)
    save_file(tensors, str(out / WEIGHTS_NAME))
    held = "['soft_prompt']" if drop else "['layer_weights', 'soft_prompt']"
    needed = "['layer_weights', 'soft_prompt']" if drop else "['soft_prompt']"
    with pytest.raises(ValueError, match=re.escape(f"holds the tensors {held}") + ".*" + re.escape(f"needs {needed}")):
        spt_embed.load(out)


def test_template_survives_save_load_and_export(backbone_dir, tmp_path):
    model = make(backbone_dir, prompt=TEMPLATE)
    texts = [*SENTENCES, ""]
    expected = without_prompt(model, texts)
    assert torch.allclose(encode(model, texts), expected, atol=1e-6)
    out = tmp_path / "adapter"
    model.save(str(out))
    plain = SentenceTransformer(str(spt_embed.export(out, tmp_path / "plain")), device="cpu")
    settings = json.loads((tmp_path / "plain" / "config_sentence_transformers.json").read_text())
    assert settings["prompts"] == template_prompts(TEMPLATE) and settings["default_prompt_name"] == DEFAULT_PROMPT
    loaded = [spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu"), plain]
    for encoder in loaded:
        assert default_prompt(encoder) == TEMPLATE
        # encode, and the query / document routes (mteb's retrieval, spt-embed index) all keep the template once
        for route in (encoder.encode, encoder.encode_query, encoder.encode_document):
            assert torch.allclose(route(texts, convert_to_tensor=True), expected, atol=1e-5)
        # an instruction given at encode time goes inside the template, not in its place
        instructed = encoder.encode_query(SENTENCES, prompt=compose_prompt(encoder, "hello "), convert_to_tensor=True)
        inside = encode(model, [TEMPLATE + "hello " + text for text in SENTENCES], prompt="")
        assert torch.allclose(instructed, inside, atol=1e-5)


def test_compose_prompt_without_template(backbone_dir):
    model = make(backbone_dir)
    assert default_prompt(model) is None
    assert compose_prompt(model, None) is None and compose_prompt(model, "Q: ") == "Q: "


@pytest.mark.parametrize("readout", ["soft-mean", "layer-mix"])
def test_export_refuses_readouts_other_than_last(backbone_dir, tmp_path, readout):
    out = tmp_path / "adapter"
    make(backbone_dir, readout).save(str(out))
    with pytest.raises(ValueError, match=f"Readout '{readout}' cannot be exported.*spt_embed.load"):
        spt_embed.export(out, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_info_shows_readout_template_and_layer_weights(backbone_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    make(backbone_dir, "layer-mix", prompt=TEMPLATE).save(str(out))
    main(["info", str(out)])
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert rows["readout"] == "layer-mix"
    assert rows["text template"] == f"{TEMPLATE!r} before every text"
    assert rows["trainable parameters"] == f"{4 * 32 + 3:,}"  # K x hidden soft tokens, 2 layers + the embeddings


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the template applies once in every task, with or without query/document prompts


def toy_template_encoder(embed, dim):
    return SentenceTransformer(
        modules=[ToyModule(embed, dim)],
        device="cpu",
        prompts=template_prompts("T: "),
        default_prompt_name=DEFAULT_PROMPT,
    )


@pytest.mark.usefixtures("data_root")
@pytest.mark.parametrize(
    ("query_prompt", "document_prompt", "expected_query", "expected_document"),
    [(None, None, "T: ", "T: "), ("Q: ", None, "T: Q: ", "T: "), ("Q: ", "D: ", "T: Q: ", "T: D: ")],
)
def test_mteb_applies_the_template_once(query_prompt, document_prompt, expected_query, expected_document):
    for task, embed, dim in (("STSBenchmark", perfect_sts, 2), ("SciFact", one_hot_topic, TOPICS)):
        model = toy_template_encoder(embed, dim)
        encoder = ev.mteb_encoder(model, query_prompt=query_prompt, document_prompt=document_prompt)
        assert default_prompt(model) == "T: "  # kept for the tasks that encode without a prompt type
        mteb.evaluate(encoder, get_tasks([task]), cache=None, co2_tracker=False, show_progress_bar=False)
        calls = model[0].calls
        assert calls
        for prompt, route, _ in calls:
            wanted = {"query": expected_query, "document": expected_document}.get(route, "T: ")
            assert prompt == wanted, (task, route, prompt)
