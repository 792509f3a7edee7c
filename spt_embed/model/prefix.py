"""Prefix tuning (method='prefix'; Li & Liang 2021, P-tuning v2) on the PromptEOL baseline, through peft: K trained
key/value vectors at every decoder layer in front of the text, read at the template's last token.

The prefix is an adapter on a `BaselineModule` (baselines.py), which this file's `PrefixMixin` gives `add_prefix`:
the module's forward is the baseline's own (peft hands the prefix to the decoder as its cache and shifts the text's
positions by K), and its folder is the baseline's, with the peft adapter in ``prefix/`` on the named backbone
(modules.json names `spt_embed.model.baselines.BaselineModule`). The prefix changes the text's own states at every
layer, so training runs a full backward pass, and it has no place in the backbone's weights: it cannot be merged
or exported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from sentence_transformers import SentenceTransformer

from spt_embed.model.backbone import PEFT_WEIGHTS_NAME, Backbone, quiet_peft

if TYPE_CHECKING:
    from spt_embed.model.baselines import Baseline

PREFIX_SUBDIR = "prefix"  # a peft prefix-tuning adapter folder: trained keys/values at every layer
PREFIX_WEIGHTS = f"{PREFIX_SUBDIR}/{PEFT_WEIGHTS_NAME}"
PREFIX_PARAMETERS = "prompt_encoder"  # what peft's prefix parameters have in their names


class PrefixMixin:
    """`add_prefix` for `BaselineModule`, which supplies `backbone`, `tokenizer` and `_check_no_adapter`."""

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


def prefix_baseline_encoder(
    backbone: str | os.PathLike | Backbone,
    *,
    num_tokens: int = 16,
    init_text: str | None = None,
    baseline: Baseline | str = "prompteol",
    max_length: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> SentenceTransformer:
    """Prefix tuning on the PromptEOL baseline: `num_tokens` trained keys/values at every layer in front of the
    text, read at the template's last token (``means in one word:"``), ready for contrastive training. The prefix
    changes the text's own states, so training needs a full backward pass. Save it as it is (the prefix/ adapter
    on the named backbone); it cannot be merged."""
    from spt_embed.model.baselines import baseline_encoder

    model = baseline_encoder(backbone, baseline, max_length=max_length, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft's random init, when no init_text is given
        model[0].add_prefix(num_tokens, init_text=init_text)
    return model
