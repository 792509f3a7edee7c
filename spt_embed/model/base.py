"""What every method that embeds with a decoder backbone shares, as a sentence-transformers input module.

Each `spt-embed train --method` has its file beside this one:

    suffix, prompt   module.py       `SuffixPromptModule`: K soft tokens after the text (prompt: before it)
    deep-suffix      deep_suffix.py  `DeepSuffixModule`, a `SuffixPromptModule` with per-layer offsets
    prefix           prefix.py       `PrefixMixin`: a peft prefix-tuning adapter on a `BaselineModule`
    lora             lora.py         `LoraMixin`: a peft LoRA adapter on a `BaselineModule`, and its merge

and baselines.py holds `BaselineModule`, the zero-shot baselines (mean, last token, PromptEOL) that prefix and
lora train an adapter on; the one class their folders name. A subclass of `BackboneModule` adds its own
weights, `preprocess`, `forward`, and the `save` / `load` of its own config file. The base holds the backbone, its
tokenizer and the `BackboneRef` naming it; it writes a self-contained folder's backbone (``backbone/``) and, on
load, finds the backbone a saved folder names and refuses one whose width or fingerprint differs from what the
folder was saved with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules.input_module import InputModule

from spt_embed.atomic import apply_umask
from spt_embed.model.backbone import Backbone, load_backbone
from spt_embed.model.bidirectional import is_bidirectional
from spt_embed.model.config import BackboneRef
from spt_embed.model.specs import NAMED_BACKBONES

logger = logging.getLogger(__name__)

BACKBONE_SUBDIR = "backbone"  # a saved folder's own backbone + tokenizer (save_pretrained)


@contextlib.contextmanager
def grouped_query_sdpa() -> Iterator[None]:
    """Let SDPA attend grouped-query heads in place instead of copying keys/values once per query head.

    transformers copies them (`repeat_kv`) on CPU unless TRANSFORMERS_SDPA_FORCE_GQA=1, and autograd keeps the
    copies: on SmolLM2 (3 key/value heads for 9 query heads) that is about 300 MB of a 32-pair training step.
    Same numbers either way; a user's own setting of the variable wins.
    """
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if name in os.environ:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


class BackboneModule(InputModule):
    """A decoder backbone with its tokenizer and reference; subclasses add what their method trains."""

    save_in_root = True
    # For the errors about a saved folder: what it is, and what loading it on another backbone would mean.
    folder_kind = "Folder"
    mismatch_hint = "its weights were trained for that backbone. Load it on the backbone it was saved on"

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.backbone_ref = backbone.ref

    @property
    def is_causal(self) -> bool:
        return not is_bidirectional(self.backbone.config)

    def get_embedding_dimension(self) -> int:
        return self.backbone.config.hidden_size

    @staticmethod
    def check_texts(inputs: Sequence[Any]) -> list[str]:
        """The inputs as a list, each checked to be a string; a TypeError naming the first that is not."""
        for index, item in enumerate(inputs):
            if not isinstance(item, str):
                raise TypeError(f"Input {index} is {type(item).__name__}, expected str: {item!r:.80}")
        return list(inputs)

    def appended_specials(self) -> int:
        """How many special tokens the tokenizer appends after a text (an EOS, for example); 0 for most decoders."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return len(full) - start - len(plain)
        return 0

    @staticmethod
    def cut_keeping_end(rows: list[list[int]], limit: int, kept: int) -> list[list[int]]:
        """Each row cut to `limit` tokens from the middle: the start and the last `kept` tokens (a template's tail
        and the special tokens after it) survive."""
        return [row if len(row) <= limit else row[: limit - kept] + row[len(row) - kept :] for row in rows]

    def left_pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token id rows as left-padded `input_ids` and `attention_mask`; an empty row gets one pad token, so that
        every row has a position to read."""
        rows = [row or [self.tokenizer.pad_token_id] for row in rows]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, tokens in enumerate(rows):
            input_ids[index, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[index, width - len(tokens) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def write_backbone(self, folder: Path) -> BackboneRef:
        """Save the backbone and its tokenizer into `folder`/backbone; returns the reference that names it there."""
        self.backbone.save_pretrained(folder / BACKBONE_SUBDIR)
        self.tokenizer.save_pretrained(folder / BACKBONE_SUBDIR)
        apply_umask(folder / BACKBONE_SUBDIR)  # safetensors' writer creates its files 0600
        return dataclasses.replace(self.backbone_ref, source=BACKBONE_SUBDIR)

    @classmethod
    def load_saved_backbone(cls, folder: Path, ref: BackboneRef, options: Mapping[str, Any]) -> Backbone:
        """The backbone that the folder saved with `ref` names, checked against `ref`.

        `options` (a load's `model_kwargs`): `backbone` overrides where the backbone comes from, `dtype` is the
        weights' dtype, `allow_backbone_mismatch` loads one with another fingerprint with a warning."""
        source = options.get("backbone")
        if source is None:
            source = ref.source
            # A self-contained folder names its backbone relative to itself ("backbone").
            if source not in NAMED_BACKBONES and not Path(source).is_absolute():
                source = folder / source
        backbone = load_backbone(source, dtype=options.get("dtype", torch.float32))
        if ref.hidden_size and backbone.ref.hidden_size != ref.hidden_size:
            raise ValueError(
                f"{cls.folder_kind} {folder} was saved for a backbone with hidden size {ref.hidden_size}, but "
                f"{source} has {backbone.ref.hidden_size}. Load it on its own backbone ({ref.source!r})."
            )
        if backbone.ref.fingerprint != ref.fingerprint:
            message = (
                f"{cls.folder_kind} {folder} was saved on backbone {ref.source!r} (fingerprint {ref.fingerprint}) "
                f"but {source} has fingerprint {backbone.ref.fingerprint}: {cls.mismatch_hint}"
            )
            if not options.get("allow_backbone_mismatch"):
                raise ValueError(message + ", or pass allow_backbone_mismatch=True to load anyway.")
            logger.warning("%s; loading anyway (allow_backbone_mismatch=True).", message)
        return backbone
