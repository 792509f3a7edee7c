"""User-facing constructors: a suffix-prompt encoder is a SentenceTransformer whose first module is ours."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize

from spt_embed.model.config import CONFIG_NAME, Init, Placement
from spt_embed.model.module import SuffixPromptModule

# Module types an adapter folder may name in modules.json; anything else would run foreign code.
_TRUSTED_PREFIXES = ("spt_embed.", "sentence_transformers.")

# Weight dtypes a command accepts. bfloat16 roughly halves encode time on CPUs with AVX512-BF16 (measured:
# README "Speed"), at a cosine of >= 0.998 to float32 embeddings; embeddings always come out float32.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("float32", "bfloat16", "float16") or itself; a clear error otherwise."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"Unsupported dtype {value!r}: use one of {', '.join(DTYPES)}.")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def weights_dtype(model: torch.nn.Module) -> str:
    """The name of the dtype most of a model's weights are in (an SPT encoder: its backbone's)."""
    sizes: dict[torch.dtype, int] = {}
    for param in model.parameters():
        sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    if not sizes:
        return "float32"
    dtype = max(sizes, key=sizes.__getitem__)
    return dtype_name(dtype) if dtype in DTYPES.values() else str(dtype).removeprefix("torch.")


def add_dtype_argument(parser: Any) -> None:
    """The `--dtype` option of the commands that encode."""
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="weights' dtype while encoding (default float32); bfloat16 is about 2x faster on CPUs with AVX512-BF16 "
        "or AMX, embeddings stay float32",
    )


# Trained adapters shipped inside the package, loadable by name.
BUNDLED_ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"


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
    dtype: str | torch.dtype = torch.float32,
    device: str | None = None,
) -> SuffixPromptEncoder:
    """Load a saved adapter (or a bundled one by name) as a SentenceTransformer; no trust_remote_code needed.

    `backbone` overrides where the frozen backbone is loaded from (the fingerprint is still checked unless
    `allow_backbone_mismatch`).
    """
    path = resolve_adapter_path(name_or_path)
    _check_module_types(path)
    model_kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "allow_backbone_mismatch": allow_backbone_mismatch}
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


def open_encoder(
    spec: str | os.PathLike, *, device: str | None = None, dtype: str | torch.dtype = torch.float32
) -> SentenceTransformer:
    """Any encoder a command accepts: a spt-embed adapter (folder or bundled name) or a SentenceTransformer folder,
    with its weights in `dtype`."""
    text = str(spec)
    path = Path(text).expanduser()
    dtype = parse_dtype(dtype)
    if text in bundled_adapters() or (path / CONFIG_NAME).is_file():
        return load(text, device=device, dtype=dtype)
    if (path / "modules.json").is_file():
        # sentence-transformers refuses module classes from outside its library (e.g. a saved LoRA baseline,
        # spt_embed.model.baselines.BaselineModule) unless trusted; ours are, anything else stays refused.
        try:
            _check_module_types(path)
            trusted = True
        except ValueError:
            trusted = False
        model = SentenceTransformer(str(path), device=device, local_files_only=True, trust_remote_code=trusted)
        return model if dtype == torch.float32 else model.to(dtype)
    from spt_embed.model.backbone import NAMED_BACKBONES

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
