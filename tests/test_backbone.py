import json

import pytest
import torch

from spt_embed.model import backbone as bb
from spt_embed.model import identity, specs
from spt_embed.model.backbone import load_backbone, resolve_source

from .conftest import ARCHS, make_backbone


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_local_directory_frozen(backbones, arch):
    loaded = load_backbone(backbones[arch])
    assert loaded.ref.model_type == arch
    assert loaded.ref.hidden_size == 32 and loaded.ref.is_causal
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None


def test_fingerprint_is_stable_and_sensitive(tmp_path, backbones):
    first = load_backbone(backbones["llama"]).ref.fingerprint
    assert load_backbone(backbones["llama"]).ref.fingerprint == first
    assert load_backbone(make_backbone(tmp_path / "other", "llama", seed=7)).ref.fingerprint != first
    assert load_backbone(backbones["qwen2"]).ref.fingerprint != first


def test_fingerprint_notices_a_changed_layer(backbones):
    loaded = load_backbone(backbones["llama"])
    before = identity.fingerprint(loaded.model)
    with torch.no_grad():
        loaded.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert identity.fingerprint(loaded.model) != before


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    directory = make_backbone(tmp_path / "nopad", "llama")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))
    loaded = load_backbone(directory)
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token


@pytest.mark.parametrize(
    "setup, error, message",
    [
        (lambda t: t / "missing", FileNotFoundError, "not found. Pass a registered name"),
        (lambda t: t, FileNotFoundError, "has no config.json"),
        (lambda t: _write(t / "weights.bin", "x"), ValueError, "not a .gguf model"),
        (lambda t: _write(t / "spt_config.json", "{}").parent, ValueError, "is a spt-embed adapter, not a backbone"),
        (lambda t: "no-such-model-name", FileNotFoundError, "smollm2-135m"),
    ],
    ids=["missing", "empty-dir", "not-gguf", "adapter-dir", "unknown-name"],
)
def test_bad_backbone_specs(tmp_path, setup, error, message):
    with pytest.raises(error, match=message):
        resolve_source(setup(tmp_path))


def test_broken_model_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="Could not load a backbone"):
        load_backbone(tmp_path)


def test_named_backbone_without_its_package(monkeypatch):
    monkeypatch.setitem(
        specs.NAMED_BACKBONES, "ghost-1m", specs.PackagedModel("no_such_package_xyz", "g.gguf", "pip install ghost")
    )
    with pytest.raises(FileNotFoundError, match="pip install ghost"):
        resolve_source("ghost-1m")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SPT_EMBED_CACHE", str(tmp_path / "c"))
    assert bb.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPT_EMBED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bb.cache_dir() == tmp_path / "xdg" / "spt_embed"


def test_file_hash_is_remembered(tmp_path, monkeypatch):
    file = _write(tmp_path / "m.gguf", "abc")
    first = identity.file_sha256(file)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    monkeypatch.setattr(identity.hashlib, "sha256", lambda: pytest.fail("hashed twice"))
    assert identity.file_sha256(file) == first


def _write(path, text):
    path.write_text(text)
    return path
