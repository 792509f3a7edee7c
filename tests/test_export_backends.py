"""`spt-embed export --backend onnx | openvino [--quantize int8]`: sentence-transformers loads the result with its own
backend and gets the PyTorch export's embeddings; wrong options, missing packages and adapters that cannot be exported
are refused before anything is written. The conversions need Optimum: those tests skip, naming what is missing, where
it is not installed (or fails to import); the refusals run everywhere."""

import json
import os
import sys

import pytest
import torch
from sentence_transformers import SentenceTransformer

import spt_embed
from spt_embed.cli.main import main
from spt_embed.model import export as export_module
from spt_embed.model.export import BACKEND_MODULES, EXPORT_MARKER, ExportBackend, backend_problem, onnx_int8_preset

from .conftest import SENTENCES

TEXTS = [*SENTENCES, "", " ".join(SENTENCES * 10)]


def needs(backend: str):
    """Skip where the backend's extra is missing, except under SPT_EMBED_REQUIRE_OPENVINO=1 (`make test-openvino`,
    which installs it), where the test runs and a missing package fails it."""
    problem = backend_problem(ExportBackend(backend))
    required = backend == "openvino" and os.environ.get("SPT_EMBED_REQUIRE_OPENVINO") == "1"
    return pytest.mark.skipif(problem is not None and not required, reason=f"backend {backend!r} unavailable: {problem}")


def perturbed(backbone, **kwargs):
    """An encoder whose soft tokens differ from their initialisation, as after training."""
    model = spt_embed.SuffixPromptEncoder.from_backbone(backbone, num_tokens=3, device="cpu", **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.prompt_module.soft_prompt.add_(torch.randn(model.prompt_module.soft_prompt.shape, generator=generator) * 0.5)
    return model


@pytest.fixture
def adapter(tmp_path, backbone_dir):
    folder = tmp_path / "adapter"
    perturbed(backbone_dir).save(str(folder))
    return folder


@pytest.fixture
def llama_adapter(tmp_path, backbones):
    folder = tmp_path / "adapter"
    perturbed(backbones["llama"]).save(str(folder))
    return folder


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def encode(model):
    return model.encode(TEXTS, convert_to_tensor=True)


@needs("onnx")
def test_onnx_export_matches_pytorch(adapter, tmp_path):
    out = spt_embed.export(adapter, tmp_path / "plain-onnx", backend="onnx")
    assert (out / "onnx" / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["backend"] == "onnx" and record["quantization"] is None
    assert record["probe_min_cosine_to_torch"] >= 0.999
    onnx_model = SentenceTransformer(str(out), backend="onnx", device="cpu")  # no trust_remote_code, no file_name
    assert type(onnx_model.transformers_model).__name__.startswith("ORT")
    got = encode(onnx_model)
    assert cosines(got, encode(SentenceTransformer(str(out), device="cpu"))).min() >= 0.999
    assert cosines(got, encode(spt_embed.load(adapter))).min() >= 0.999


@needs("onnx")
def test_onnx_int8_is_the_default_file(llama_adapter, tmp_path):
    import onnx

    out = spt_embed.export(llama_adapter, tmp_path / "int8", backend="onnx", quantize="int8")
    assert [p.name for p in (out / "onnx").iterdir()] == ["model.onnx"]  # only the int8 file, under the default name
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["quantization"] == f"onnxruntime dynamic int8 ({onnx_int8_preset()} preset)"
    ops = {node.op_type for node in onnx.load(str(out / "onnx" / "model.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
    model = SentenceTransformer(str(out), backend="onnx", device="cpu")
    assert cosines(encode(model), encode(spt_embed.load(llama_adapter))).min() > 0.9


@needs("openvino")
@pytest.mark.parametrize("quantize, min_cosine", [(None, 0.999), ("int8", 0.9)], ids=["fp32", "int8"])
def test_openvino_export_loads(llama_adapter, tmp_path, quantize, min_cosine):
    calibration = SENTENCES * 8 if quantize else None
    out = spt_embed.export(
        llama_adapter, tmp_path / "ov", backend="openvino", quantize=quantize, calibration_texts=calibration
    )
    assert sorted(p.name for p in (out / "openvino").iterdir()) == ["openvino_model.bin", "openvino_model.xml"]
    assert not (out / "_calibration").exists()
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["backend"] == "openvino" and (record["quantization"] is None) == (quantize is None)
    model = SentenceTransformer(str(out), backend="openvino", device="cpu")
    assert type(model.transformers_model).__name__.startswith("OV")
    # Optimum Intel never fills a position_ids input (OpenVINO then reads stale memory): the export computes it
    assert "position_ids" not in model.transformers_model.input_names
    assert cosines(encode(model), encode(spt_embed.load(llama_adapter))).min() >= min_cosine


def test_quantize_needs_an_onnx_or_openvino_backend(llama_adapter, tmp_path, capsys):
    with pytest.raises(ValueError, match="quantize='int8' needs backend 'onnx' or 'openvino'.*nothing was written"):
        spt_embed.export(llama_adapter, tmp_path / "plain", quantize="int8")
    assert main(["export", str(llama_adapter), str(tmp_path / "plain"), "--quantize", "int8"]) == 2
    assert "needs backend 'onnx' or 'openvino'" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backend": "tensorrt"}, "Unknown export backend 'tensorrt'; choose one of torch, onnx, openvino"),
        ({"backend": "onnx", "quantize": "int4"}, "Unknown quantize option 'int4'"),
        ({"backend": "onnx", "calibration_texts": ["a text"]}, "used by backend='openvino' with quantize='int8' only"),
        ({"calibration_texts": ["a text"]}, "used by backend='openvino' with quantize='int8' only"),
    ],
    ids=["backend", "quantize", "calibration-onnx", "calibration-torch"],
)
def test_bad_options_are_refused(llama_adapter, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        spt_embed.export(llama_adapter, tmp_path / "plain", **options)
    assert not (tmp_path / "plain").exists()


def test_cli_refuses_calibration_without_openvino_int8(llama_adapter, tmp_path, capsys):
    texts = tmp_path / "calibration.txt"
    texts.write_text("a man is playing a flute .\n")
    args = ["export", str(llama_adapter), str(tmp_path / "plain"), "--calibration", str(texts)]
    assert main(args) == 2
    assert "--calibration" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_missing_packages_name_the_extra(llama_adapter, tmp_path, monkeypatch, capsys, backend):
    for name, _ in BACKEND_MODULES[ExportBackend(backend)]:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as for a package not installed
    with pytest.raises(ImportError, match=rf"not installed\. Install them with: pip install 'spt-embed\[{backend}\]'"):
        spt_embed.export(llama_adapter, tmp_path / "out", backend=backend)
    assert main(["export", str(llama_adapter), str(tmp_path / "out"), "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert f"spt-embed export: error: backend='{backend}' needs" in err and f"spt-embed[{backend}]" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize(
    "kind, message",
    [
        ({"readout": "soft-mean"}, "Readout 'soft-mean' cannot be exported"),
        ({"method": "deep-suffix"}, "Method 'deep-suffix' cannot be exported"),
    ],
    ids=["soft-mean", "deep-suffix"],
)
def test_adapters_that_cannot_be_exported_are_refused_for_every_backend(
    backbones, tmp_path, monkeypatch, backend, kind, message
):
    monkeypatch.setattr(export_module, "require_backend", lambda backend: None)  # as if the packages were installed
    folder = tmp_path / "adapter"
    perturbed(backbones["llama"], **kind).save(str(folder))
    with pytest.raises(ValueError, match=f"{message}.*nothing was written"):
        spt_embed.export(folder, tmp_path / "out", backend=backend)
    assert not (tmp_path / "out").exists()


def test_int8_preset_is_one_sentence_transformers_offers():
    assert onnx_int8_preset() in ("arm64", "avx2", "avx512", "avx512_vnni")


# ----- encoding and indexing with an exported model file (--backend on index / encode / search) ----------------


@needs("openvino")
def test_index_and_search_run_on_the_openvino_file(llama_adapter, tmp_path, capsys):
    import numpy as np

    from spt_embed.model.encoder import open_encoder
    from spt_embed.model.identity import model_fingerprint
    from spt_embed.retrieval.index import load_index
    from spt_embed.retrieval.indexing import index_corpus

    out = spt_embed.export(llama_adapter, tmp_path / "ov", backend="openvino")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(SENTENCES)))
    index_corpus(str(out), corpus, tmp_path / "idx", backend="openvino")
    index = load_index(tmp_path / "idx")
    assert index.metadata.backend == "openvino"
    # Queries are encoded by the recorded backend, reopened from the recorded spec: each document finds itself.
    assert [row[0].id for row in index.search(SENTENCES, k=1)] == [f"d{i}" for i in range(len(SENTENCES))]
    assert index.model.get_backend() == "openvino" and type(index.model.transformers_model).__name__.startswith("OV")
    # The same folder on PyTorch is another fingerprint: its queries are refused by this index.
    torch_model = open_encoder(str(out))
    assert model_fingerprint(torch_model) != model_fingerprint(index.model)
    with pytest.raises(ValueError, match="fingerprint"):
        index.model = torch_model
    assert main(["encode", "--model", str(out), "--backend", "openvino", "--input", str(corpus),
                 "--output", str(tmp_path / "e.npy")]) == 0
    got = torch.from_numpy(np.load(tmp_path / "e.npy"))
    assert cosines(got, torch_model.encode(SENTENCES, convert_to_tensor=True)).min() >= 0.999


def test_backend_runs_exported_folders_only(llama_adapter, tmp_path, capsys):
    from spt_embed.model.encoder import open_encoder

    with pytest.raises(ValueError, match=r"is a spt-embed adapter; backend 'openvino' runs an exported model file\. "
                       r"Export it first: `spt-embed export .* OUT --backend openvino`"):
        open_encoder(str(llama_adapter), backend="openvino")
    plain = spt_embed.export(llama_adapter, tmp_path / "plain")  # PyTorch only: no openvino/ file in it
    with pytest.raises(FileNotFoundError, match=r"has no openvino/openvino_model\.xml, the file backend 'openvino' "
                       r"runs\. Export the adapter with `spt-embed export ADAPTER .* --backend openvino --overwrite`"):
        open_encoder(str(plain), backend="openvino")
    with pytest.raises(ValueError, match="dtype 'bfloat16' sets PyTorch weights; backend 'onnx' runs its exported"):
        open_encoder(str(plain), backend="onnx", dtype="bfloat16")
    with pytest.raises(ValueError, match="Unknown backend 'tensorrt'; choose one of torch, onnx, openvino"):
        open_encoder(str(plain), backend="tensorrt")
    code = main(["index", "--model", str(plain), "--corpus", str(tmp_path / "c.jsonl"), "--output",
                 str(tmp_path / "idx"), "--engine", "ray", "--backend", "openvino"])
    assert code == 2 and "--backend openvino applies to --engine local" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_cli_backend_choices_are_the_export_backends():
    from spt_embed.cli.options import BACKEND_CHOICES

    assert BACKEND_CHOICES == tuple(backend.value for backend in ExportBackend)
