"""Encoding in bfloat16: the adapter still loads, embeddings stay float32 and close, and eval/index record the dtype."""

import json

import numpy as np
import pytest
import torch

import spt_embed.evaluation.evaluate as ev
from spt_embed import SuffixPromptEncoder, export, load, save
from spt_embed.cli.main import main
from spt_embed.model.backbone import load_backbone
from spt_embed.model.dtypes import parse_dtype, weights_dtype
from spt_embed.model.encoder import open_encoder
from spt_embed.retrieval.index import load_index

from .test_eval import data_root  # noqa: F401  (fixture: tiny local task files)

TEXTS = ["a man plays the flute", "the red cat sleeps", "dog runs in the park", "a"]


@pytest.fixture
def adapter(backbones, tmp_path):
    path = tmp_path / "adapter"
    save(SuffixPromptEncoder.from_backbone(str(backbones["llama"]), num_tokens=3, init="random", seed=3), path)
    return path


def test_backbone_fingerprint_does_not_depend_on_dtype(backbones):
    fp32 = load_backbone(backbones["llama"])
    bf16 = load_backbone(backbones["llama"], dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16 and fp32.model.dtype == torch.float32
    assert bf16.ref.fingerprint == fp32.ref.fingerprint


def test_bfloat16_adapter_loads_and_embeds_close_to_float32(adapter):
    fp32 = load(adapter)
    bf16 = load(adapter, dtype="bfloat16")  # an adapter trained in float32 must not be refused as a mismatch
    assert weights_dtype(bf16) == "bfloat16" and weights_dtype(fp32) == "float32"
    a = fp32.encode(TEXTS, convert_to_tensor=True)
    b = bf16.encode(TEXTS, convert_to_tensor=True)
    assert b.dtype == torch.float32
    assert torch.allclose(b.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)  # normalised in float32
    assert (a * b).sum(dim=1).min() > 0.98
    assert not torch.equal(a, b)  # really ran in bfloat16


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="float64.*float32, bfloat16, float16"):
        parse_dtype("float64")
    assert parse_dtype("float16") is torch.float16


def test_plain_sentence_transformer_folder_in_bfloat16(adapter, tmp_path):
    plain = tmp_path / "plain"
    export(adapter, plain)  # modules.json, no spt_config.json: the SentenceTransformer branch of open_encoder
    model = open_encoder(plain, dtype="bfloat16")
    assert type(model[0]).__name__ == "Transformer" and weights_dtype(model) == "bfloat16"
    embedding = model.encode(TEXTS, convert_to_numpy=True)
    assert embedding.dtype == np.float32
    assert ((embedding * load(adapter).encode(TEXTS)).sum(axis=1)).min() > 0.98


def test_eval_results_record_the_dtype_and_are_not_mixed(data_root, backbones, tmp_path):
    out = tmp_path / "results"
    llama = str(backbones["llama"])
    ev.evaluate(llama, ["STSBenchmark"], out, baseline="mean", batch_size=8, dtype="bfloat16")
    assert json.loads((out / ev.IDENTITY_NAME).read_text())["identity"]["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="bfloat16"):
        ev.evaluate(llama, ["STSBenchmark"], out, baseline="mean", batch_size=8)  # float32 into a bfloat16 folder


def test_identity_written_before_dtype_existed_reads_as_float32(data_root, backbones, tmp_path, monkeypatch):
    out = tmp_path / "results"
    llama = str(backbones["llama"])
    ev.evaluate(llama, ["STSBenchmark"], out, baseline="mean", batch_size=8)
    record = json.loads((out / ev.IDENTITY_NAME).read_text())
    del record["identity"]["dtype"]
    (out / ev.IDENTITY_NAME).write_text(json.dumps(record))
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("results exist: nothing to load"))
    ev.evaluate(llama, ["STSBenchmark"], out, baseline="mean", batch_size=8)


def test_index_built_in_bfloat16_searches_in_bfloat16(adapter, tmp_path, capsys):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    main(["index", "--model", str(adapter), "--corpus", str(corpus), "--output", str(tmp_path / "idx"),
          "--dtype", "bfloat16"])
    index = load_index(tmp_path / "idx")
    assert index.metadata.dtype == "bfloat16"
    assert weights_dtype(index.model) == "bfloat16"  # queries are encoded as the documents were
    top = index.search([TEXTS[1]], 1)[0][0]
    assert top.id == "2"  # plain text ids are line numbers, from 1
    capsys.readouterr()
    main(["encode", "--model", str(adapter), "--input", str(corpus), "--output", str(tmp_path / "e.npy"),
          "--dtype", "bfloat16"])
    embeddings = np.load(tmp_path / "e.npy")
    assert embeddings.dtype == np.float32 and embeddings.shape[0] == len(TEXTS)


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, caplog):
    import torch

    from spt_embed.model import dtypes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dtypes, "native_bf16", lambda: False)
    assert dtypes.resolve_dtype("auto") == torch.float32
    with caplog.at_level("WARNING", logger="spt_embed.model.dtypes"):
        assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16  # allowed, with the reason it is slow here
    assert "emulated" in caplog.text
    caplog.clear()
    monkeypatch.setattr(dtypes, "native_bf16", lambda: True)
    assert dtypes.resolve_dtype("auto") == torch.bfloat16
    with caplog.at_level("WARNING", logger="spt_embed.model.dtypes"):
        assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16
    assert "emulated" not in caplog.text
