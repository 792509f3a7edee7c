"""Baselines of a backbone as SentenceTransformers: zero-shot mean pooling, last token, PromptEOL, and the LoRA
baseline (PromptEOL with LoRA trained contrastively on the backbone).

Zero-shot: the frozen decoder reads each text (optionally wrapped in a template) and one vector is pooled from
its last hidden layer. PromptEOL (Jiang et al. 2023) wraps the text as ``This sentence : "{text}" means in one
word:"`` and takes the last token, the position that would predict the one-word summary.

A saved baseline folder holds ``baseline_config.json`` and, depending on the weights: nothing else (zero-shot: the
backbone is named and fingerprinted), ``lora/`` or ``prefix/`` (a peft adapter on the named backbone: what
`spt-embed train --method lora|prefix` writes, checkpoints and final folder alike), or ``backbone/`` (a fine-tuned
decoder: LoRA merged into the weights by `merge_lora`, e.g. through `merge_lora_folder` / `spt-embed merge-lora`;
the LoRA baseline's final folder was written this way before LoRA runs were saved adapter-only, and such folders
load as they always did).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize

from spt_embed.atomic import write_json
from spt_embed.model.backbone import Backbone, freeze, load_backbone
from spt_embed.model.base import BACKBONE_SUBDIR, BackboneModule  # noqa: F401 (a fine-tuned backbone's folder)
from spt_embed.model.config import BackboneRef
from spt_embed.model.identity import fingerprint
from spt_embed.model.soft_prompt import last_token_pool, left_align, left_pad_position_ids

PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
BASELINE_CONFIG_NAME = "baseline_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # the weights inside a peft adapter folder (beside adapter_config.json)
LORA_SUBDIR = "lora"  # a peft LoRA adapter folder
LORA_WEIGHTS = f"{LORA_SUBDIR}/{PEFT_WEIGHTS_NAME}"
PREFIX_SUBDIR = "prefix"  # a peft prefix-tuning adapter folder: trained keys/values at every layer
PREFIX_WEIGHTS = f"{PREFIX_SUBDIR}/{PEFT_WEIGHTS_NAME}"
PEFT_SUBDIRS = {"lora": LORA_SUBDIR, "prefix": PREFIX_SUBDIR}  # a baseline's peft adapter kind -> its subfolder


@contextlib.contextmanager
def quiet_peft():
    """Silence the FutureWarning peft triggers by asking transformers 5 for `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


class Baseline(str, enum.Enum):
    MEAN = "mean"  # average of the last hidden states over the text's tokens
    LAST = "last"  # last hidden state of the last token
    PROMPTEOL = "prompteol"  # last token of the PromptEOL template

    @property
    def template(self) -> str:
        return PROMPTEOL_TEMPLATE if self is Baseline.PROMPTEOL else "{text}"

    @property
    def pooling(self) -> str:
        return "mean" if self is Baseline.MEAN else "last"


def parse_baseline(value: Baseline | str) -> Baseline:
    try:
        return Baseline(value)
    except ValueError:
        allowed = ", ".join(b.value for b in Baseline)
        raise ValueError(f"Unknown baseline {value!r}; choose one of {allowed}.") from None


class BaselineModule(BackboneModule):
    """Backbone + a text template + mean or last-token pooling; left padding with real-token positions.

    The backbone is frozen unless LoRA is attached (`add_lora`); `merge_lora` folds it into the weights (a plain
    decoder again, faster to run; `merged_lora` then records what was merged)."""

    folder_kind = "Baseline"
    mismatch_hint = "the backbone's weights changed. Restore that backbone or retrain"

    def __init__(
        self,
        backbone: Backbone,
        baseline: Baseline | str,
        *,
        max_length: int = 512,
        trained_from: BackboneRef | None = None,
        merged_lora: dict[str, Any] | None = None,
    ):
        super().__init__(backbone)
        self.baseline = parse_baseline(baseline)
        # The backbone this one was fine-tuned from; None while the weights are the source's own.
        self.trained_from = trained_from
        # The LoRA merged into this backbone's weights (`lora_summary()`: r, alpha, targets, parameters), when
        # `merge_lora` made it; None otherwise, and for merged folders written before it was recorded.
        self.merged_lora = merged_lora
        self.max_seq_length = max_length
        prefix, suffix = self.baseline.template.split("{text}", 1)
        self._prefix, self._suffix = prefix, suffix
        # Tokens kept from the end when a text is cut: the template's tail and any special tokens the tokenizer
        # appends, so a long document still ends in `means in one word:"` (the position that is pooled).
        self._tail = len(self.tokenizer(suffix, add_special_tokens=False)["input_ids"]) + self.appended_specials()

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Templated texts (a prompt goes inside the template, before the text), cut to max_seq_length keeping
        the template's tail, left-padded."""
        texts = [self._prefix + (prompt or "") + text + self._suffix for text in self.check_texts(inputs)]
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        limit = self.max_seq_length
        ids = self.cut_keeping_end(ids, limit, self._tail)
        # A row needs one token to pool from: an empty text with no template and no special tokens gets a pad.
        return self.left_pad(ids)

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        # Left-padded, as preprocess() made it, even where a loss joined columns with padding on the right.
        input_ids, mask = left_align(features["input_ids"], features["attention_mask"])  # (B, L)
        positions = left_pad_position_ids(mask)  # a left-padded row gets the positions it would have alone
        # With a prefix, peft shifts these by its K positions: the text continues after it, as after the init text.
        with warnings.catch_warnings():
            # peft hands a prefix to the decoder as `past_key_values`, which transformers 5 renames `cache` and
            # warns about on every call; the prefix is exactly what that argument is for.
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            out = self.backbone(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False
            )
        hidden = out.last_hidden_state  # (B, L, H)
        if self.baseline.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = last_token_pool(hidden)  # left padding: index -1 is a real token in every row
        features["sentence_embedding"] = pooled.float()  # (B, H)
        return features

    @property
    def peft_kind(self) -> str | None:
        """"lora" or "prefix" while a peft adapter wraps the backbone; None for a plain backbone."""
        from peft import PeftModel, PeftType

        if not isinstance(self.backbone, PeftModel):
            return None
        return "prefix" if self.backbone.active_peft_config.peft_type == PeftType.PREFIX_TUNING else "lora"

    @property
    def has_lora(self) -> bool:
        return self.peft_kind == "lora"

    def adapter_parameters(self) -> int:
        """Parameters of the peft adapter on the backbone (LoRA matrices or prefix keys/values); 0 without one."""
        if self.peft_kind is None:
            return 0
        names = ("lora_",) if self.peft_kind == "lora" else ("prompt_encoder",)
        return sum(p.numel() for n, p in self.backbone.named_parameters() if any(k in n for k in names))

    def lora_summary(self) -> dict[str, Any]:
        """The attached LoRA's shape and size: {"r", "alpha", "targets", "parameters"} (what `info` shows)."""
        if not self.has_lora:
            raise ValueError("This baseline carries no LoRA adapter.")
        config = self.backbone.active_peft_config
        targets = config.target_modules  # a set of module names, or peft's regular expression (a string)
        return {
            "r": config.r,
            "alpha": config.lora_alpha,
            "targets": targets if isinstance(targets, str) else sorted(targets),
            "parameters": self.adapter_parameters(),
        }

    def add_lora(self, lora_config) -> None:
        """Wrap the backbone in peft LoRA layers (a `peft.LoraConfig`); only they train, the base stays frozen."""
        from spt_embed.model.backbone import attach_lora

        self._check_no_adapter()
        with quiet_peft():
            self.backbone = attach_lora(self.backbone, lora_config)

    def _check_no_adapter(self) -> None:
        if self.peft_kind is not None:
            raise ValueError(f"This baseline already carries a {self.peft_kind} adapter; it takes only one.")

    def add_prefix(self, num_tokens: int, *, init_text: str | None = None) -> None:
        """Prefix tuning (Li & Liang 2021; P-tuning v2) through peft: `num_tokens` trained key/value vectors at
        every layer in front of the text; only they train. With `init_text` they start as the keys/values the
        backbone itself computes for that text's tokens (tiled or cut to `num_tokens`), the real-activation init
        of Li & Liang; without it, peft's random init."""
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        self._check_no_adapter()
        config = PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=num_tokens)
        init = self._prefix_init(num_tokens, init_text) if init_text else None
        with quiet_peft():
            self.backbone = get_peft_model(self.backbone, config)
        if init is not None:
            with torch.no_grad():
                self.backbone.prompt_encoder[self.backbone.active_adapter].embedding.weight.copy_(init)

    def _prefix_init(self, num_tokens: int, text: str) -> torch.Tensor:
        """(num_tokens, layers * 2 * kv_dim): per position, every layer's key then value as peft lays them out
        (peft views a row as (layers * 2, kv_heads, head_dim): layer l's key at 2l, its value at 2l + 1)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init_text {text!r} has no tokens; give a non-empty text.")
        ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
        with torch.no_grad():
            out = self.backbone(input_ids=torch.tensor([ids]), use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5.x renamed it
        rows = []
        for layer in cache.layers:  # keys/values: (1, kv_heads, K, head_dim)
            for states in (layer.keys, layer.values):
                rows.append(states[0].permute(1, 0, 2).reshape(num_tokens, -1))  # (K, kv_heads * head_dim)
        return torch.cat(rows, dim=1).float()

    def merge_lora(self) -> None:
        """Fold LoRA into the backbone weights: a plain decoder again (no peft layers: faster to run), saved in full
        (backbone/) from now on. Embeddings change only by float rounding (fp32: under 1e-6)."""
        if self.peft_kind == "prefix":
            raise ValueError("A prefix adapter cannot be merged into the backbone's weights; save it as it is.")
        if not self.has_lora:
            raise ValueError("This baseline carries no LoRA to merge; attach and train one with add_lora first.")
        self.merged_lora = self.lora_summary()
        self.backbone = freeze(self.backbone.merge_and_unload())
        self.trained_from = self.trained_from or self.backbone_ref

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """baseline_config.json, plus the peft adapter (lora/ or prefix/) or a fine-tuned backbone (backbone/) if
        any; an unchanged backbone is only named and fingerprinted."""
        from spt_embed._version import __version__

        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        ref = self.backbone_ref
        if self.peft_kind is not None:
            self.backbone.save_pretrained(out / PEFT_SUBDIRS[self.peft_kind])  # the adapter only; the base is `ref`
        elif self.trained_from is not None:
            ref = dataclasses.replace(self.write_backbone(out), fingerprint=fingerprint(self.backbone))
        payload = {
            "baseline": self.baseline.value,
            "max_length": self.max_seq_length,
            "backbone": dataclasses.asdict(ref),
            "trained_from": dataclasses.asdict(self.trained_from) if self.trained_from else None,
            **({"merged_lora": self.merged_lora} if self.merged_lora else {}),
            "spt_embed_version": __version__,
        }
        write_json(out / BASELINE_CONFIG_NAME, payload)

    @classmethod
    def load(
        cls, model_name_or_path: str, subfolder: str = "", model_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> BaselineModule:
        """Load a folder written by `save`; the backbone must match its recorded fingerprint. `model_kwargs` may
        carry `dtype` (and the other options of `BackboneModule.load_saved_backbone`)."""
        folder = Path(model_name_or_path) / subfolder
        config_path = folder / BASELINE_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a saved baseline: it has no {BASELINE_CONFIG_NAME}.")
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
            ref = BackboneRef(**saved["backbone"])
            trained_from = BackboneRef(**saved["trained_from"]) if saved.get("trained_from") else None
            merged_lora = saved.get("merged_lora")
            if merged_lora is not None and not isinstance(merged_lora, dict):
                raise TypeError(f"merged_lora is {type(merged_lora).__name__}, expected an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{config_path} is corrupted ({exc!r}).") from None
        backbone = cls.load_saved_backbone(folder, ref, model_kwargs or {})
        module = cls(
            backbone,
            saved["baseline"],
            max_length=saved["max_length"],
            trained_from=trained_from,
            merged_lora=merged_lora,
        )
        adapters = [kind for kind, sub in PEFT_SUBDIRS.items() if (folder / sub).is_dir()]
        if len(adapters) > 1:
            raise ValueError(f"{folder} holds both lora/ and prefix/; a baseline carries one adapter. Remove one.")
        if adapters:
            from peft import PeftModel

            adapter = folder / PEFT_SUBDIRS[adapters[0]]
            # peft falls back to a pickled adapter_model.bin (or a hub download) without the safetensors file.
            if not (adapter / PEFT_WEIGHTS_NAME).is_file():
                raise FileNotFoundError(
                    f"{adapter / PEFT_WEIGHTS_NAME} is missing: a {adapters[0]} adapter's weights are read "
                    f"from safetensors only; re-save the baseline."
                )
            with quiet_peft():
                module.backbone = PeftModel.from_pretrained(module.backbone, str(adapter))
        return module


def baseline_encoder(
    backbone: str | os.PathLike | Backbone,
    baseline: Baseline | str,
    *,
    max_length: int = 512,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> SentenceTransformer:
    """A SentenceTransformer for a zero-shot baseline of `backbone` (registered name, model directory or GGUF)."""
    baseline = parse_baseline(baseline)
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, dtype=dtype)
    module = BaselineModule(backbone, baseline, max_length=max_length)
    modules: list[torch.nn.Module] = [module, Normalize()] if normalize else [module]
    return SentenceTransformer(modules=modules, device=device)


def lora_baseline_encoder(
    backbone: str | os.PathLike | Backbone,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    baseline: Baseline | str = Baseline.PROMPTEOL,
    max_length: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> SentenceTransformer:
    """The PromptEOL baseline with fresh LoRA layers on its backbone, ready for contrastive training (the LLM2Vec /
    PromptEOL way). After training `model.save(path)` writes the adapter only (lora/, the backbone named and
    fingerprinted); `model[0].merge_lora()` first writes the merged backbone instead (backbone/, a full copy)."""
    from peft import LoraConfig

    model = baseline_encoder(backbone, baseline, max_length=max_length, device=device)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA's A matrices start random
        model[0].add_lora(lora)
    return model


def prefix_baseline_encoder(
    backbone: str | os.PathLike | Backbone,
    *,
    num_tokens: int = 16,
    init_text: str | None = None,
    baseline: Baseline | str = Baseline.PROMPTEOL,
    max_length: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> SentenceTransformer:
    """Prefix tuning on the PromptEOL baseline: `num_tokens` trained keys/values at every layer in front of the
    text, read at the template's last token (``means in one word:"``), ready for contrastive training. The prefix
    changes the text's own states, so training needs a full backward pass. Save it as it is (the prefix/ adapter
    on the named backbone); it cannot be merged."""
    model = baseline_encoder(backbone, baseline, max_length=max_length, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft's random init, when no init_text is given
        model[0].add_prefix(num_tokens, init_text=init_text)
    return model


def merge_lora_for_inference(model: SentenceTransformer) -> SentenceTransformer:
    """Fold a LoRA baseline's adapter into its backbone in memory (nothing is written): the encoder then runs as a
    plain decoder, without the LoRA layers' extra matrix products and kernels on every projection. Any other model
    is returned as it is. Embeddings change only by float rounding (fp32: under 1e-6)."""
    module = model[0] if len(model) else None
    if isinstance(module, BaselineModule) and module.has_lora:
        module.merge_lora()
    return model


def merge_lora_folder(model: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write a LoRA baseline folder (a run of `spt-embed train --method lora`, or one of its checkpoints) again with
    the LoRA merged into the backbone: ``backbone/`` (a full copy of the decoder, fp32) instead of ``lora/``, which
    loads without peft and can go where a plain decoder goes. `output` must be new or empty, and neither the folder
    itself nor inside or around it. Returns `output`."""
    from spt_embed.atomic import atomic_folder
    from spt_embed.model.encoder import is_baseline_folder, load

    source = Path(model).expanduser()
    out = Path(output).expanduser()
    if not is_baseline_folder(source):
        raise ValueError(
            f"{source} is not a LoRA baseline folder (no {BASELINE_CONFIG_NAME} beside modules.json); merge a folder "
            f"that `spt-embed train --method lora` wrote (nothing was written)."
        )
    here, there = source.resolve(), out.resolve()
    if there == here or here in there.parents or there in here.parents:
        relation = "is" if there == here else "is inside" if here in there.parents else "contains"
        raise ValueError(
            f"The output folder {out} {relation} the LoRA folder {source}; choose an output folder outside it "
            f"(nothing was written)."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new one (nothing was written).")
    encoder = load(source)
    module = encoder[0]
    if not module.has_lora:
        if module.peft_kind == "prefix":
            reason = "it holds a prefix adapter, which has no place in the backbone's weights"
        elif module.trained_from is not None:
            reason = "its backbone/ is merged already"
        else:
            reason = "it holds no LoRA adapter (a zero-shot baseline)"
        raise ValueError(f"{source} cannot be merged: {reason} (nothing was written).")
    module.merge_lora()
    if out.is_dir():
        out.rmdir()  # empty: atomic_folder builds the folder beside it and renames it into place
    return atomic_folder(out, lambda folder: encoder.save(str(folder)), overwrite=False, marker=BASELINE_CONFIG_NAME)
