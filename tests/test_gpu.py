"""What must hold on CUDA (tests marked `gpu`, skipped without a GPU), and a CPU smoke run of eval/gpu_check.py, the
script that runs the GPU checks on the real backbone the day a GPU is lent."""

import json

import pytest
import torch
import torch.nn.functional as F

from spt_embed import ForwardPath, SuffixPromptEncoder

from .conftest import SENTENCES, load_script


def load_gpu_check():
    return load_script("eval/gpu_check.py", "gpu_check")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["suffix", "deep-suffix"])
def test_fast_path_equals_full_on_cuda(backbones, method):
    model = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, method=method, device="cuda")
    module = model.prompt_module
    assert module.soft_prompt.device.type == "cuda"
    grads, losses = {}, {}
    for path in (ForwardPath.FULL, ForwardPath.FAST):
        module.zero_grad()
        module.forward_path = path
        features = {k: v.to("cuda") for k, v in module.preprocess(SENTENCES).items()}
        embedding = F.normalize(module(features)["sentence_embedding"], dim=-1)
        loss = F.cross_entropy(embedding @ embedding.T.flip(0) / 0.05, torch.arange(len(SENTENCES), device="cuda"))
        loss.backward()
        losses[path], grads[path] = loss.item(), module.soft_prompt.grad.clone()
    assert losses[ForwardPath.FAST] == pytest.approx(losses[ForwardPath.FULL], abs=1e-5)
    error = (grads[ForwardPath.FAST] - grads[ForwardPath.FULL]).norm() / grads[ForwardPath.FULL].norm()
    assert error.item() <= 1e-4


@pytest.mark.gpu
def test_cuda_encodes_as_the_cpu_does(backbones):
    cpu = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu")
    gpu = SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cuda")
    assert torch.allclose(gpu.encode(SENTENCES, convert_to_tensor=True).cpu(),
                          cpu.encode(SENTENCES, convert_to_tensor=True), atol=1e-4)


def test_gpu_check_smoke_on_cpu(backbones, tmp_path, capsys):
    """The script's sections run end to end (on the CPU, a tiny backbone, 3 steps) and write one JSON file."""
    gpu_check = load_gpu_check()
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--backbone", str(backbones["llama"]), "--steps", "3",
                           "--skip", "bench_step", "--output", str(out)])
    report = json.loads(out.read_text())
    assert set(report) >= {"environment", "fast_vs_full", "train", "encode", "ok"}
    assert report["fast_vs_full"]["suffix/float32"]["ok"], report["fast_vs_full"]
    assert report["fast_vs_full"]["deep-suffix/float32"]["ok"], report["fast_vs_full"]
    assert report["fast_vs_full"]["suffix/bfloat16"]["vs_float32_full"].keys() == {"full", "fast"}
    assert report["train"]["steps"] == 3 and report["train"]["seconds_per_step"] > 0
    assert len(report["train"]["losses"]) == 3
    assert report["encode"]["float32"]["texts_per_s"] > 0
    assert code == (0 if report["ok"] else 1)


def test_gpu_check_stops_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_check = load_gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cuda", "--output", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["environment"]["ok"] is False and "train" not in report


def test_gpu_check_random_weights_keep_the_shapes_not_the_weights(backbones, tmp_path):
    """--random-weights: the backbone's config and tokenizer with fresh weights (the same costs, other numbers)."""
    from transformers import AutoModelForCausalLM

    gpu_check = load_gpu_check()
    folder = gpu_check.random_backbone(str(backbones["llama"]), str(tmp_path / "random"))
    source = AutoModelForCausalLM.from_pretrained(backbones["llama"]).state_dict()
    random = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert {k: v.shape for k, v in random.items()} == {k: v.shape for k, v in source.items()}
    assert any(not torch.equal(random[k], source[k]) for k in source)
    encoder = SuffixPromptEncoder.from_backbone(folder, num_tokens=2, device="cpu")
    assert encoder.encode(SENTENCES[:2]).shape == (2, encoder.get_sentence_embedding_dimension())
