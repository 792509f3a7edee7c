"""`spt-embed export` (plain SentenceTransformer, no custom code) refuses the methods it cannot express, naming the
method and what to use instead, before anything is written: prompt (soft tokens before the text) and lora (merged
or not), as it refuses deep-suffix (test_deep_suffix), prefix (test_prefix), task prompts, tails and readouts."""

import re

import pytest
import torch
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed.cli.main import main
from spt_embed.model.base import BACKBONE_SUBDIR
from spt_embed.model.baselines import baseline_encoder
from spt_embed.model.lora import LORA_SUBDIR, lora_baseline_encoder
from tests.conftest import SENTENCES, move_lora_b

ALTERNATIVE = r"spt_embed\.load\(\.\.\.\) \(or SentenceTransformer\((adapter|folder), trust_remote_code=True\)\)"


def refused(spec, out, capsys, message):
    """Export of `spec` into `out` fails with `message` (a regex) in Python and on the CLI; nothing is written."""
    with pytest.raises(ValueError, match=message):
        spt_embed.export(spec, out)
    assert not out.exists()
    capsys.readouterr()
    assert main(["export", str(spec), str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search("^spt-embed export: error: " + message, err, flags=re.MULTILINE)
    assert not out.exists()
    out.mkdir()  # an empty folder given as the output stays empty
    with pytest.raises(ValueError, match=message):
        spt_embed.export(spec, out)
    assert not any(out.iterdir())


@pytest.mark.parametrize("tail", [None, '" means in one word:"'])
def test_export_refuses_the_prompt_method(backbones, tmp_path, capsys, tail):
    """What `spt-embed train --method prompt` saves: a suffix-method config with placement='prefix'."""
    model = spt_embed.SuffixPromptEncoder.from_backbone(
        backbones["llama"], num_tokens=3, placement="prefix", tail=tail, device="cpu"
    )
    adapter = tmp_path / "adapter"
    model.save(str(adapter))
    message = r"Method 'prompt' \(soft tokens before the text: placement='prefix'\) cannot be exported.*" + ALTERNATIVE
    refused(adapter, tmp_path / "plain", capsys, message)
    reloaded = spt_embed.load(adapter)  # the alternative named gives the same encoder
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    assert (reloaded.encode(SENTENCES, convert_to_tensor=True) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_export_refuses_lora(backbones, tmp_path, capsys, merged):
    """What `spt-embed train --method lora` saves (lora/ beside the named backbone), and a merged folder
    (backbone/, as `spt-embed merge-lora` and earlier versions write)."""
    model = lora_baseline_encoder(backbones["llama"], r=2, device="cpu")
    move_lora_b(model, 0.05)  # as after training: LoRA's B matrices start at zero
    if merged:
        model[0].merge_lora()
    folder = tmp_path / "lora"
    model.save(str(folder))
    assert (folder / (BACKBONE_SUBDIR if merged else LORA_SUBDIR)).is_dir()
    message = r"Method 'lora' cannot be exported as a plain SentenceTransformer.*PromptEOL template.*" + ALTERNATIVE
    message += (r".*its backbone/ subfolder already is the merged decoder as a plain transformers model" if merged
                else r".*run `spt-embed merge-lora FOLDER OUT`: OUT/backbone/ is that decoder")
    refused(folder, tmp_path / "plain", capsys, message)
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    for reloaded in (spt_embed.load(folder), SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")):
        assert (reloaded.encode(SENTENCES, convert_to_tensor=True) - expected).abs().max().item() <= 1e-5
    if merged:  # the other alternative named: backbone/ loads with transformers alone, tokenizer beside it
        from transformers import AutoModel, AutoTokenizer

        decoder = AutoModel.from_pretrained(folder / BACKBONE_SUBDIR)
        AutoTokenizer.from_pretrained(folder / BACKBONE_SUBDIR)
        merged_q = model[0].backbone.state_dict()["layers.0.self_attn.q_proj.weight"]
        assert torch.equal(decoder.state_dict()["layers.0.self_attn.q_proj.weight"], merged_q)


def test_export_refuses_a_lora_model_in_memory(backbones, tmp_path):
    model = lora_baseline_encoder(backbones["llama"], r=2, device="cpu")
    model[0].merge_lora()
    with pytest.raises(ValueError, match="Method 'lora' cannot be exported.*spt_embed.load"):
        spt_embed.export(model, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_export_refuses_a_zero_shot_baseline(backbones, tmp_path):
    folder = tmp_path / "baseline"
    baseline_encoder(backbones["llama"], "prompteol", device="cpu").save(str(folder))
    with pytest.raises(ValueError, match="zero-shot 'prompteol' baseline .* cannot be exported.*spt_embed.load"):
        spt_embed.export(folder, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_export_refuses_the_prefix_method(backbones, tmp_path, capsys):
    """What `spt-embed train --method prefix` saves (prefix/ beside the named backbone), untrained here."""
    from spt_embed.model.prefix import prefix_baseline_encoder

    folder = tmp_path / "prefix"
    prefix_baseline_encoder(backbones["llama"], num_tokens=3, init_text="hello world", device="cpu").save(str(folder))
    refused(folder, tmp_path / "plain", capsys, r"Method 'prefix' cannot be exported.*" + ALTERNATIVE)
