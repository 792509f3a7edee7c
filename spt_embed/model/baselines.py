"""The zero-shot baselines of a backbone as SentenceTransformers (mean pooling, last token, PromptEOL), and
`BaselineModule`, the module they share with the two methods that train a peft adapter on them: prefix tuning
(prefix.py, `PrefixMixin`) and LoRA (lora.py, `LoraMixin`).

Zero-shot: the frozen decoder reads each text (optionally wrapped in a template) and one vector is pooled from
its last hidden layer. PromptEOL (Jiang et al. 2023) wraps the text as ``This sentence : "{text}" means in one
word:"`` and takes the last token, the position that would predict the one-word summary.

A saved baseline folder holds ``baseline_config.json`` and, depending on the weights: nothing else (zero-shot: the
backbone is named and fingerprinted), ``lora/`` or ``prefix/`` (a peft adapter on the named backbone: what
`spt-embed train --method lora|prefix` writes, checkpoints and final folder alike), or ``backbone/`` (a fine-tuned
decoder: LoRA merged into the weights by `merge_lora`, e.g. through `merge_lora_folder` / `spt-embed merge-lora`;
the LoRA baseline's final folder was written this way before LoRA runs were saved adapter-only, and such folders
load as they always did). Every kind is saved as this one class, `spt_embed.model.baselines.BaselineModule`, in
modules.json; the adapter's subfolder says which method trained it.
"""

from __future__ import annotations

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
from spt_embed.model.backbone import PEFT_WEIGHTS_NAME, Backbone, load_backbone, quiet_peft
from spt_embed.model.base import BACKBONE_SUBDIR, BackboneModule  # noqa: F401 (a fine-tuned backbone's folder)
from spt_embed.model.config import BackboneRef
from spt_embed.model.identity import fingerprint
from spt_embed.model.lora import LORA_PARAMETERS, LORA_SUBDIR, LoraMixin
from spt_embed.model.prefix import PREFIX_PARAMETERS, PREFIX_SUBDIR, PrefixMixin
from spt_embed.model.soft_prompt import last_token_pool, left_align, left_pad_position_ids

# The methods' public names, importable from here too (train/bench_step.py imports prefix_baseline_encoder from here).
from spt_embed.model.lora import LORA_WEIGHTS, lora_baseline_encoder  # noqa: F401
from spt_embed.model.lora import merge_lora_for_inference, merge_lora_folder  # noqa: F401
from spt_embed.model.prefix import PREFIX_WEIGHTS, prefix_baseline_encoder  # noqa: F401

PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
BASELINE_CONFIG_NAME = "baseline_config.json"
PEFT_SUBDIRS = {"lora": LORA_SUBDIR, "prefix": PREFIX_SUBDIR}  # a baseline's peft adapter kind -> its subfolder
PEFT_PARAMETERS = {"lora": LORA_PARAMETERS, "prefix": PREFIX_PARAMETERS}  # kind -> what its parameters' names hold


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


class BaselineModule(LoraMixin, PrefixMixin, BackboneModule):
    """Backbone + a text template + mean or last-token pooling; left padding with real-token positions.

    The backbone is frozen unless a peft adapter is attached, at most one: LoRA (`add_lora`, lora.py; `merge_lora`
    folds it into the weights, a plain decoder again, faster to run; `merged_lora` then records what was merged) or
    a prefix (`add_prefix`, prefix.py). Saving and loading the adapter's folder is this class's own."""

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

    def adapter_parameters(self) -> int:
        """Parameters of the peft adapter on the backbone (LoRA matrices or prefix keys/values); 0 without one."""
        if self.peft_kind is None:
            return 0
        key = PEFT_PARAMETERS[self.peft_kind]
        return sum(p.numel() for n, p in self.backbone.named_parameters() if key in n)

    def _check_no_adapter(self) -> None:
        if self.peft_kind is not None:
            raise ValueError(f"This baseline already carries a {self.peft_kind} adapter; it takes only one.")

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
