"""The LoRA baseline (method='lora'): the PromptEOL baseline with peft LoRA layers on the backbone's projections,
trained contrastively (the LLM2Vec / PromptEOL way), and the merge of that LoRA into the backbone's weights.

LoRA is an adapter on a `BaselineModule` (baselines.py), which this file's `LoraMixin` gives `add_lora`,
`lora_summary` and `merge_lora`: the module's forward is the baseline's own, and its folder is the baseline's, with
the peft adapter in ``lora/`` on the named backbone (modules.json names `spt_embed.model.baselines.BaselineModule`).
Merged, the module is a plain fine-tuned decoder again, saved in full (``backbone/``): in memory for encoding
(`merge_lora_for_inference`), or as a new folder (`merge_lora_folder`, `spt-embed merge-lora`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sentence_transformers import SentenceTransformer

from spt_embed.model.backbone import PEFT_WEIGHTS_NAME, Backbone, attach_lora, freeze, quiet_peft

if TYPE_CHECKING:
    from spt_embed.model.baselines import Baseline

LORA_SUBDIR = "lora"  # a peft LoRA adapter folder
LORA_WEIGHTS = f"{LORA_SUBDIR}/{PEFT_WEIGHTS_NAME}"
LORA_PARAMETERS = "lora_"  # what peft's LoRA parameters have in their names


class LoraMixin:
    """LoRA for `BaselineModule`, which supplies `backbone`, `peft_kind`, `adapter_parameters`, `_check_no_adapter`
    and the `trained_from` / `merged_lora` / `backbone_ref` that record a merge."""

    @property
    def has_lora(self) -> bool:
        return self.peft_kind == "lora"

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
        self._check_no_adapter()
        with quiet_peft():
            self.backbone = attach_lora(self.backbone, lora_config)

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


def lora_baseline_encoder(
    backbone: str | os.PathLike | Backbone,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    baseline: Baseline | str = "prompteol",
    max_length: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> SentenceTransformer:
    """The PromptEOL baseline with fresh LoRA layers on its backbone, ready for contrastive training (the LLM2Vec /
    PromptEOL way). After training `model.save(path)` writes the adapter only (lora/, the backbone named and
    fingerprinted); `model[0].merge_lora()` first writes the merged backbone instead (backbone/, a full copy)."""
    from peft import LoraConfig

    from spt_embed.model.baselines import baseline_encoder

    model = baseline_encoder(backbone, baseline, max_length=max_length, device=device)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA's A matrices start random
        model[0].add_lora(lora)
    return model


def merge_lora_for_inference(model: SentenceTransformer) -> SentenceTransformer:
    """Fold a LoRA baseline's adapter into its backbone in memory (nothing is written): the encoder then runs as a
    plain decoder, without the LoRA layers' extra matrix products and kernels on every projection. Any other model
    is returned as it is. Embeddings change only by float rounding (fp32: under 1e-6)."""
    module = model[0] if len(model) else None
    if isinstance(module, LoraMixin) and module.has_lora:
        module.merge_lora()
    return model


def merge_lora_folder(model: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write a LoRA baseline folder (a run of `spt-embed train --method lora`, or one of its checkpoints) again with
    the LoRA merged into the backbone: ``backbone/`` (a full copy of the decoder, fp32) instead of ``lora/``, which
    loads without peft and can go where a plain decoder goes. `output` must be new or empty, and neither the folder
    itself nor inside or around it. Returns `output`."""
    from spt_embed.atomic import atomic_folder
    from spt_embed.model.baselines import BASELINE_CONFIG_NAME
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
