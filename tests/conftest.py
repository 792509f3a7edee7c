"""Tiny random Llama, Qwen2 (and Mistral) backbones with a word-level tokenizer, all built here: no network."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
    Qwen2Tokenizer,
    TrainerCallback,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = (
    "a an the man woman child dog cat plays playing flute guitar piano sleeps runs eats food in on park house "
    "is are was quickly slowly red blue green big small sentence means one word : \" . , ? ! hello world"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]

SENTENCES = [
    "a man is playing a flute .",
    "the dog runs in the park quickly",
    "hello",
    "a small red cat sleeps on the big blue house , the child eats food .",
]


def build_tokenizer(arch: str):
    """Llama: a word-level tokenizer that prepends BOS. Qwen2: a byte-level BPE (one token per byte), since
    transformers picks Qwen2Tokenizer for a qwen2 directory whatever tokenizer.json holds."""
    if arch == "qwen2":
        vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
        vocab["<|endoftext|>"] = len(vocab)
        return Qwen2Tokenizer(vocab=vocab, merges=[])
    return _word_level_tokenizer(add_bos=True)


def _word_level_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:  # a Llama-style template that prepends BOS, to exercise special tokens around the text
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def _config(arch: str, hidden: int, vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    if arch == "llama":
        return LlamaModel, LlamaConfig(**common)
    if arch == "mistral":
        return MistralModel, MistralConfig(**common)
    return Qwen2Model, Qwen2Config(**common)


def make_backbone(directory: Path, arch: str = "llama", *, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random decoder + tokenizer to `directory` and return it."""
    tokenizer = build_tokenizer(arch)
    model_cls, config = _config(arch, hidden, len(tokenizer))
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {arch: make_backbone(root / arch, arch) for arch in ARCHS}


@pytest.fixture(params=ARCHS)
def backbone_dir(request, backbones) -> Path:
    return backbones[request.param]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own GGUF cache unless it sets one itself."""
    monkeypatch.setenv("SPT_EMBED_CACHE", str(tmp_path / "spt-cache"))
    logging.getLogger("spt_embed").setLevel(logging.INFO)


class Kill(TrainerCallback):
    """Simulates a kill right after the checkpoint at `step` was written."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run the test under each umask; files a command writes must follow it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


# Set by `make test` (and so CI): tests marked `ray` then run, and fail if Ray is missing, instead of being skipped.
REQUIRE_RAY = "SPT_EMBED_REQUIRE_RAY"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (with the reason shown) where there is none, as on CI. Tests marked
    `ray` need the `ray` extra: skipped where it is not installed, unless SPT_EMBED_REQUIRE_RAY=1."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here); `make gpu-check` runs the GPU checks")
    skip_ray = pytest.mark.skip(reason="needs Ray (pip install 'spt-embed[ray]'); `make test` installs it")
    no_gpu = not torch.cuda.is_available()
    no_ray = importlib.util.find_spec("ray") is None and os.environ.get(REQUIRE_RAY) != "1"
    for item in items:
        if no_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if no_ray and item.get_closest_marker("ray") is not None:
            item.add_marker(skip_ray)


def load_script(relative: str, name: str):
    """A repository script (e.g. train/compare.py) imported as module `name`, so tests can call its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def move_lora_b(model: torch.nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Draw every LoRA B matrix of `model` from N(0, std): peft starts them at zero, so a fresh adapter changes
    nothing (and leaves A without a gradient) until training moves them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std, generator=generator)
