"""User-facing constructors: a suffix-prompt encoder is a SentenceTransformer whose first module is ours."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize

from spt_embed.config import CONFIG_NAME, Init, Placement
from spt_embed.module import SuffixPromptModule

# Module types an adapter folder may name in modules.json; anything else would run foreign code.
_TRUSTED_PREFIXES = ("spt_embed.", "sentence_transformers.")

# Trained adapters shipped inside the package, loadable by name.
BUNDLED_ADAPTERS_DIR = Path(__file__).parent / "adapters"


class SuffixPromptEncoder(SentenceTransformer):
    """A SentenceTransformer made of a `SuffixPromptModule` (and a `Normalize` by default)."""

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike,
        *,
        num_tokens: int = 16,
        init: Init | str = Init.TEXT,
        init_text: str | None = None,
        placement: Placement | str = Placement.SUFFIX,
        max_length: int = 512,
        normalize: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
    ) -> SuffixPromptEncoder:
        """A fresh (untrained) encoder on a frozen backbone: a registered name, a model directory or a GGUF file."""
        module = SuffixPromptModule.from_backbone(
            backbone,
            num_tokens=num_tokens,
            init=init,
            init_text=init_text,
            placement=placement,
            max_length=max_length,
            seed=seed,
            dtype=dtype,
        )
        modules: list[torch.nn.Module] = [module, Normalize()] if normalize else [module]
        return cls(modules=modules, device=device)

    @property
    def prompt_module(self) -> SuffixPromptModule:
        return self[0]


def bundled_adapters() -> list[str]:
    if not BUNDLED_ADAPTERS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_ADAPTERS_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def resolve_adapter_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled adapter name or a local adapter folder; a clear error for anything else."""
    if str(name_or_path) in bundled_adapters():
        return BUNDLED_ADAPTERS_DIR / str(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        bundled = ", ".join(bundled_adapters()) or "none installed"
        raise FileNotFoundError(f"Adapter {str(name_or_path)!r} not found: not a folder nor a bundled adapter ({bundled}).")
    if not (path / CONFIG_NAME).is_file():
        hint = " It looks like a plain SentenceTransformer: load it with SentenceTransformer(path)." if (
            path / "modules.json"
        ).is_file() else ""
        raise FileNotFoundError(f"{path} is not a spt-embed adapter folder: it has no {CONFIG_NAME}.{hint}")
    return path


def _check_module_types(path: Path) -> None:
    modules_json = path / "modules.json"
    if not modules_json.is_file():
        raise FileNotFoundError(f"{modules_json} is missing; save adapters with model.save(path) or spt_embed.save().")
    try:
        entries = json.loads(modules_json.read_text(encoding="utf-8"))
        types = [entry["type"] for entry in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{modules_json} is corrupted ({exc}).") from None
    foreign = [t for t in types if not t.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise ValueError(
            f"{modules_json} names module types outside spt_embed and sentence_transformers: {foreign}. "
            f"spt_embed.load will not import them; if you trust them, use SentenceTransformer(path, "
            f"trust_remote_code=True)."
        )


def load(
    name_or_path: str | os.PathLike,
    *,
    backbone: str | os.PathLike | None = None,
    allow_backbone_mismatch: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> SuffixPromptEncoder:
    """Load a saved adapter (or a bundled one by name) as a SentenceTransformer; no trust_remote_code needed.

    `backbone` overrides where the frozen backbone is loaded from (the fingerprint is still checked unless
    `allow_backbone_mismatch`).
    """
    path = resolve_adapter_path(name_or_path)
    _check_module_types(path)
    model_kwargs: dict[str, Any] = {"dtype": dtype, "allow_backbone_mismatch": allow_backbone_mismatch}
    if backbone is not None:
        model_kwargs["backbone"] = str(backbone)
    # Every module type was checked to come from spt_embed or sentence_transformers above.
    return SuffixPromptEncoder(str(path), trust_remote_code=True, model_kwargs=model_kwargs, device=device)


def save(model: SentenceTransformer, path: str | os.PathLike, *, include_backbone: bool = False) -> None:
    """Save an encoder: adapter only by default (a few KB), or with the backbone for a self-contained folder."""
    module = model[0]
    if not isinstance(module, SuffixPromptModule):
        raise TypeError(f"Expected a suffix-prompt encoder, got a model whose first module is {type(module).__name__}.")
    module.save_backbone = include_backbone
    try:
        model.save(str(path))
    finally:
        module.save_backbone = False


def open_encoder(spec: str | os.PathLike, *, device: str | None = None) -> SentenceTransformer:
    """Any encoder a command accepts: a spt-embed adapter (folder or bundled name) or a SentenceTransformer folder."""
    text = str(spec)
    path = Path(text).expanduser()
    if text in bundled_adapters() or (path / CONFIG_NAME).is_file():
        return load(text, device=device)
    if (path / "modules.json").is_file():
        # sentence-transformers refuses module classes from outside its library (e.g. a saved LoRA baseline,
        # spt_embed.baselines.BaselineModule) unless trusted; ours are, anything else stays refused.
        try:
            _check_module_types(path)
            trusted = True
        except ValueError:
            trusted = False
        return SentenceTransformer(str(path), device=device, local_files_only=True, trust_remote_code=trusted)
    from spt_embed.backbone import NAMED_BACKBONES

    if text in NAMED_BACKBONES:
        raise ValueError(
            f"{text!r} is a backbone, not an encoder: train a suffix prompt on it (`spt-embed train`) or build "
            f"an untrained one with SuffixPromptEncoder.from_backbone({text!r})."
        )
    bundled = ", ".join(bundled_adapters()) or "none installed"
    raise FileNotFoundError(
        f"Model {text!r} not found: expected a spt-embed adapter folder, a bundled adapter ({bundled}) or a "
        f"SentenceTransformer folder (with modules.json)."
    )
