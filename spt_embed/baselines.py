"""Zero-shot baselines of a backbone as plain SentenceTransformers: mean pooling, last token, PromptEOL.

No training: the frozen decoder reads each text (optionally wrapped in a template) and one vector is pooled from
its last hidden layer. PromptEOL (Jiang et al. 2023) wraps the text as ``This sentence : "{text}" means in one
word:"`` and takes the last token, the position that would predict the one-word summary.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize
from sentence_transformers.base.modules.input_module import InputModule

from spt_embed.backbone import Backbone, load_backbone
from spt_embed.soft_prompt import last_token_pool, left_pad_position_ids

PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'


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


class BaselineModule(InputModule):
    """Frozen backbone + a text template + mean or last-token pooling; left padding with real-token positions."""

    def __init__(self, backbone: Backbone, baseline: Baseline | str, *, max_length: int = 512):
        super().__init__()
        self.baseline = parse_baseline(baseline)
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.backbone_ref = backbone.ref
        self.max_seq_length = max_length
        prefix, suffix = self.baseline.template.split("{text}", 1)
        self._prefix, self._suffix = prefix, suffix
        # Tokens kept from the end when a text is cut: the template's tail and any special tokens the tokenizer
        # appends, so a long document still ends in `means in one word:"` (the position that is pooled).
        self._tail = len(self.tokenizer(suffix, add_special_tokens=False)["input_ids"]) + self._appended_specials()

    def _appended_specials(self) -> int:
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return len(full) - start - len(plain)
        return 0

    def get_embedding_dimension(self) -> int:
        return self.backbone.config.hidden_size

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Templated texts (a prompt goes inside the template, before the text), cut to max_seq_length keeping
        the template's tail, left-padded."""
        texts = []
        for index, item in enumerate(inputs):
            if not isinstance(item, str):
                raise TypeError(f"Input {index} is {type(item).__name__}, expected str: {item!r:.80}")
            texts.append(self._prefix + (prompt or "") + item + self._suffix)
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        limit = self.max_seq_length
        ids = [row if len(row) <= limit else row[: limit - self._tail] + row[len(row) - self._tail :] for row in ids]
        # A row needs one token to pool from: an empty text with no template and no special tokens gets a pad.
        ids = [row or [self.tokenizer.pad_token_id] for row in ids]
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, width - len(tokens) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        mask = features["attention_mask"]  # (B, L)
        positions = left_pad_position_ids(mask)  # a left-padded row gets the positions it would have alone
        out = self.backbone(
            input_ids=features["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False
        )
        hidden = out.last_hidden_state  # (B, L, H)
        if self.baseline.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = last_token_pool(hidden)  # left padding: index -1 is a real token in every row
        features["sentence_embedding"] = pooled.float()  # (B, H)
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "A zero-shot baseline is built from its backbone on the fly and has nothing to save; rebuild it with "
            f"baseline_encoder({self.backbone_ref.source!r}, {self.baseline.value!r})."
        )


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
