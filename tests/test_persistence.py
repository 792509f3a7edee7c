"""Save / load / export round trips and every way a saved adapter can be wrong."""

import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed import SuffixPromptEncoder
from spt_embed.model.baselines import BaselineModule, baseline_encoder
from spt_embed.model.config import CONFIG_NAME, WEIGHTS_NAME

from .conftest import SENTENCES, make_backbone


@pytest.fixture
def trained(backbone_dir):
    """An encoder whose soft tokens differ from their initialisation, as after training."""
    model = SuffixPromptEncoder.from_backbone(backbone_dir, num_tokens=4, device="cpu")
    with torch.no_grad():
        model.prompt_module.soft_prompt.add_(torch.randn_like(model.prompt_module.soft_prompt) * 0.5)
    return model


def encode(model, texts=SENTENCES):
    return model.encode(texts, convert_to_tensor=True)


def folder_size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_adapter_round_trip(trained, tmp_path):
    out = tmp_path / "adapter"
    trained.save(str(out))
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    assert not (out / "config.json").exists()  # our config never clashes with a transformers config
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # nothing pickled
    assert not (out / "backbone").exists()
    assert folder_size(out) < 100_000
    expected = encode(trained)
    assert torch.equal(encode(spt_embed.load(out)), expected)
    assert torch.equal(encode(SentenceTransformer(str(out), trust_remote_code=True, device="cpu")), expected)


def test_self_contained_folder_outlives_the_backbone(trained, tmp_path, backbone_dir):
    private_backbone = tmp_path / "private"
    shutil.copytree(backbone_dir, private_backbone)
    model = spt_embed.load(_saved(trained, tmp_path / "a"), backbone=private_backbone)
    out = tmp_path / "full"
    spt_embed.save(model, out, include_backbone=True)
    shutil.rmtree(private_backbone)
    assert (out / "backbone" / "config.json").is_file()
    assert json.loads((out / CONFIG_NAME).read_text())["backbone"]["source"] == "backbone"
    assert torch.equal(encode(spt_embed.load(out)), encode(trained))
    model.save(str(tmp_path / "again"))  # the option applied to that one save
    assert not (tmp_path / "again" / "backbone").exists()


def _saved(model, path):
    model.save(str(path))
    return path


def test_export_loads_without_custom_code(trained, tmp_path):
    adapter = _saved(trained, tmp_path / "adapter")
    plain_dir = spt_embed.export(adapter, tmp_path / "plain")
    modules = json.loads((plain_dir / "modules.json").read_text())
    assert not any("spt_embed" in m["type"] for m in modules)
    plain = SentenceTransformer(str(plain_dir), device="cpu")  # no trust_remote_code
    texts = [*SENTENCES, ""]
    assert torch.allclose(encode(plain, texts), encode(trained, texts), atol=1e-5)
    # truncation keeps the soft tokens in the export too
    long_text = " ".join(SENTENCES * 20)
    trained.max_seq_length = plain.max_seq_length = 12
    assert torch.allclose(encode(plain, [long_text]), encode(trained, [long_text]), atol=1e-5)


def test_export_refuses_to_overwrite(trained, tmp_path):
    adapter = _saved(trained, tmp_path / "adapter")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        spt_embed.export(adapter, target)
    assert (target / "precious.txt").read_text() == "keep me"


def test_hidden_size_mismatch(trained, tmp_path):
    adapter = _saved(trained, tmp_path / "adapter")
    wide = make_backbone(tmp_path / "wide", hidden=48)
    with pytest.raises(ValueError, match="hidden size 32.*has 48"):
        spt_embed.load(adapter, backbone=wide)


def test_fingerprint_mismatch(trained, tmp_path, backbone_dir):
    adapter = _saved(trained, tmp_path / "adapter")
    arch = json.loads((backbone_dir / "config.json").read_text())["model_type"]
    other = make_backbone(tmp_path / "other", arch, seed=123)  # same shapes, different weights
    with pytest.raises(ValueError, match="fingerprint.*allow_backbone_mismatch=True"):
        spt_embed.load(adapter, backbone=other)
    loaded = spt_embed.load(adapter, backbone=other, allow_backbone_mismatch=True)
    assert torch.equal(loaded.prompt_module.soft_prompt, trained.prompt_module.soft_prompt)


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10), ValueError, "corrupted or not a safetensors"),
        (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100]), ValueError, "corrupted"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError, "no soft-token weights"),
        (lambda d: (d / CONFIG_NAME).write_text("{oops"), ValueError, "not valid JSON"),
        (lambda d: (d / CONFIG_NAME).unlink(), FileNotFoundError, "not a spt-embed adapter folder"),
        (lambda d: (d / "modules.json").write_text("[{]"), ValueError, "modules.json is corrupted"),
        (
            lambda d: (d / "modules.json").write_text(
                json.dumps([{"idx": 0, "name": "0", "path": "", "type": "evil.Module"}])
            ),
            ValueError,
            "modules.json entry 0 names module type 'evil.Module', which spt-embed does not load",
        ),
    ],
    ids=["garbage-weights", "truncated-weights", "missing-weights", "bad-json", "missing-config", "bad-modules",
         "foreign-module"],
)
def test_damaged_adapter(trained, tmp_path, damage, error, message):
    adapter = _saved(trained, tmp_path / "adapter")
    damage(adapter)
    with pytest.raises(error, match=message):
        spt_embed.load(adapter)


def test_wrong_tensor_shape(trained, tmp_path):
    from safetensors.torch import save_file

    adapter = _saved(trained, tmp_path / "adapter")
    save_file({"soft_prompt": torch.zeros(3, 32)}, str(adapter / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"shape \(3, 32\), expected \(4, 32\)"):
        spt_embed.load(adapter)


@pytest.mark.parametrize(
    "make_path, error, message",
    [
        (lambda t: t / "nowhere", FileNotFoundError, "not found: not a folder nor a bundled adapter"),
        (lambda t: t, FileNotFoundError, "has no spt_config.json"),
    ],
)
def test_load_bad_paths(tmp_path, make_path, error, message):
    with pytest.raises(error, match=message):
        spt_embed.load(make_path(tmp_path))


def test_baseline_refuses_a_changed_backbone(tmp_path):
    backbone = make_backbone(tmp_path / "backbone", "llama")
    baseline_encoder(backbone, "mean").save(str(tmp_path / "baseline"))
    saved = json.loads((tmp_path / "baseline" / "baseline_config.json").read_text())
    make_backbone(tmp_path / "backbone", "llama", seed=99)  # same shapes, other weights
    with pytest.raises(ValueError, match="Baseline .* fingerprint .*weights changed. Restore that backbone or retrain"):
        BaselineModule.load(str(tmp_path / "baseline"))
    loaded = BaselineModule.load(str(tmp_path / "baseline"), model_kwargs={"allow_backbone_mismatch": True})
    assert loaded.backbone_ref.fingerprint != saved["backbone"]["fingerprint"]
