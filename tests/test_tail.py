"""A hard text tail after every text (`tail`), kept whole when a text is cut: with placement='prefix' (the `prompt`
method) the `last` readout then reads the tail, not the token where the cut fell. Tiny random Llama and Qwen2."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed import SuffixPromptEncoder
from spt_embed.cli.main import build_parser, main
from spt_embed.cli.options import config_from_args
from spt_embed.model.config import CONFIG_NAME
from spt_embed.model.identity import model_fingerprint

from .conftest import SENTENCES
from .test_readout_template import ANCHORS, POSITIVES, assert_fast_path_equals_full, contrastive_loss, encode
from .test_train import config as train_config

TAIL = '" means in one word :'  # PromptEOL's tail in the tiny word-level vocabulary
LONG = "a small red cat sleeps on the big blue house , the child eats food . " * 4


def make(backbone_dir, *, num_tokens=4, **kwargs):
    model = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=num_tokens, device="cpu", **kwargs)
    with torch.no_grad():  # soft tokens away from their init, as after training
        generator = torch.Generator().manual_seed(1)
        model.prompt_module.soft_prompt.add_(torch.randn(model.prompt_module.soft_prompt.shape, generator=generator))
    return model


def tail_ids(module):
    return module.tokenizer(TAIL, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("placement", ["suffix", "prefix"])
def test_a_cut_text_keeps_its_tail(backbone_dir, placement):
    probe = make(backbone_dir, tail=TAIL)
    tail = tail_ids(probe.prompt_module)
    room = 6  # text tokens (with any BOS) kept in front of the tail
    model = make(backbone_dir, tail=TAIL, placement=placement, max_length=4 + len(tail) + room)
    module = model.prompt_module
    full = module.tokenizer(LONG, add_special_tokens=True)["input_ids"]
    features = module.preprocess([LONG, "hello"])
    ids, mask = features["input_ids"], features["attention_mask"]
    assert ids.shape[1] == room + len(tail) == model.max_seq_length - 4  # cut to fit beside the soft tokens
    assert ids[0].tolist() == full[:room] + tail  # the text's start, then the tail whole
    short = module.tokenizer("hello", add_special_tokens=True)["input_ids"] + tail
    assert ids[1, -len(short) :].tolist() == short and mask[1].sum().item() == len(short)  # left-padded
    assert mask[1, : ids.shape[1] - len(short)].sum().item() == 0
    # without a tail the cut falls inside the text, and the last token is the text's
    plain = make(backbone_dir, placement=placement, max_length=4 + len(tail) + room).prompt_module
    assert plain.preprocess([LONG])["input_ids"][0].tolist() == full[: room + len(tail)]


@pytest.mark.parametrize("placement", ["suffix", "prefix"])
def test_tail_text_alone_equals_text_in_mixed_batch(backbone_dir, placement):
    model = make(backbone_dir, tail=TAIL, placement=placement)
    texts = [*SENTENCES, ""]
    batch = encode(model, texts, batch_size=len(texts))
    for index, text in enumerate(texts):
        assert torch.allclose(encode(model, [text])[0], batch[index], atol=1e-5), text
    assert len({tuple(row.tolist()) for row in batch}) == len(texts)  # the readout still sees the text
    untailed = make(backbone_dir, placement=placement)
    assert not torch.allclose(encode(untailed, texts), batch, atol=1e-3)  # the tail is really there


def test_prefix_placement_reads_the_tail_of_a_cut_text(backbone_dir):
    """Two texts that differ only after the cut embed alike; the embedding is that of the kept start plus the tail,
    read at the tail's last token."""
    tail = tail_ids(make(backbone_dir).prompt_module)
    model = make(backbone_dir, tail=TAIL, placement="prefix", max_length=4 + len(tail) + 6)
    one, two = encode(model, [LONG + "hello", LONG + "a dog runs"])
    assert torch.allclose(one, two, atol=1e-6)
    module = model.prompt_module
    features = module.preprocess([LONG])
    with torch.no_grad():
        states = module.backbone(
            inputs_embeds=torch.cat(
                [module.soft_prompt[None], module.backbone.get_input_embeddings()(features["input_ids"])], dim=1
            )
        ).last_hidden_state
    expected = torch.nn.functional.normalize(states[0, -1], dim=-1)
    assert torch.allclose(encode(model, [LONG])[0], expected, atol=1e-5)


def test_fast_path_equals_full_pass_with_a_tail(backbone_dir):
    model = make(backbone_dir, tail=TAIL, num_tokens=5, init="random")
    module = model.prompt_module
    module.pack_tokens = 7
    assert_fast_path_equals_full(module, lambda: contrastive_loss(model, ANCHORS, POSITIVES))


def test_the_tail_is_part_of_the_fingerprint(backbone_dir):
    """An index built through one tail is refused by an encoder with another: the fingerprint tells them apart."""
    plain, tailed = make(backbone_dir), make(backbone_dir, tail=TAIL)
    assert torch.equal(plain.prompt_module.soft_prompt, tailed.prompt_module.soft_prompt)
    assert model_fingerprint(plain) != model_fingerprint(tailed)


def test_tail_survives_save_and_load_and_old_configs_read_none(backbone_dir, tmp_path):
    model = make(backbone_dir, tail=TAIL, placement="prefix")
    out = tmp_path / "adapter"
    model.save(str(out))
    assert json.loads((out / CONFIG_NAME).read_text())["tail"] == TAIL
    expected = encode(model)
    for loaded in (spt_embed.load(out), SentenceTransformer(str(out), trust_remote_code=True, device="cpu")):
        assert loaded[0].spt_config.tail == TAIL
        assert torch.allclose(encode(loaded), expected, atol=1e-6)
    data = json.loads((out / CONFIG_NAME).read_text())
    del data["tail"]  # as written before the field existed
    (out / CONFIG_NAME).write_text(json.dumps(data))
    assert spt_embed.load(out).prompt_module.spt_config.tail == ""
    with pytest.raises(ValueError, match="tail must be a string"):
        SuffixPromptEncoder.from_backbone(backbone_dir, tail=3)


def test_a_tail_too_long_for_max_length_is_refused(backbone_dir):
    tail = tail_ids(make(backbone_dir).prompt_module)
    model = make(backbone_dir, tail=TAIL, max_length=4 + len(tail))
    with pytest.raises(ValueError, match="leaves no room for text.*raise max_length or shorten the tail"):
        encode(model, ["hello"])


def test_export_refuses_a_tail_and_info_shows_it(backbone_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    make(backbone_dir, tail=TAIL).save(str(out))
    with pytest.raises(ValueError, match="text tail.*cannot be exported.*spt_embed.load"):
        spt_embed.export(out, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    main(["info", str(out)])
    assert f"{TAIL!r} after every text" in capsys.readouterr().out


def test_prompt_method_trains_with_a_tail(tmp_path, backbones):
    args = build_parser().parse_args(["train", "--output", "o", "--method", "prompt", "--tail", TAIL])
    assert config_from_args(args, spt_embed.TrainConfig).tail == TAIL
    for method in ("lora", "prefix"):
        with pytest.raises(ValueError, match=f"tail=.*method '{method}' reads the last token of its own"):
            spt_embed.TrainConfig(method=method, tail=TAIL)
    with pytest.raises(ValueError, match="tail is empty"):
        spt_embed.TrainConfig(tail="")
    cfg = train_config(tmp_path, backbones["llama"], method="prompt", tail=TAIL, max_steps=4, save_steps=4)
    before = make(backbones["llama"]).prompt_module.backbone.state_dict()
    model = spt_embed.train(cfg)
    module = model.prompt_module
    assert module.spt_config.tail == TAIL and module.spt_config.placement.value == "prefix"
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == ["0.soft_prompt"]
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    reloaded = spt_embed.load(tmp_path / "run")
    assert reloaded.prompt_module.spt_config.tail == TAIL
    assert torch.allclose(encode(reloaded), encode(model), atol=1e-6)
