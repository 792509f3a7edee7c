"""The resolved configuration of a `spt-embed mntp` run: CLI flags and YAML recipes both fill this dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from spt_embed.recipe import RecipeConfig, Scheduler

MNTP_CONFIG_NAME = "mntp_config.json"
WIKI1M = "wiki1m"  # the bundled corpus, see data/SOURCES.md
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class MNTPConfig(RecipeConfig):
    """Bidirectional MNTP + LoRA; every field is a `spt-embed mntp` flag and a YAML key."""

    file_name: ClassVar[str] = MNTP_CONFIG_NAME
    option_kind: ClassVar[str] = "mntp"

    output: str = field(default="", metadata={"help": "Output folder: the merged backbone, logs, checkpoints/."})
    backbone: str = field(default="smollm2-135m", metadata={"help": "Registered name, HF directory or GGUF file."})
    corpus: str = field(
        default=WIKI1M,
        metadata={
            "help": "Text corpus: a plain-text file (one text per line) or .jsonl (see --text-field); 'wiki1m' is "
            "the bundled 11,914-sentence Wikipedia sample."
        },
    )
    text_field: str = field(default="text", metadata={"help": "jsonl field holding the text."})
    max_length: int = field(default=128, metadata={"help": "Tokens per text; longer texts are truncated."})
    mask_prob: float = field(default=0.2, metadata={"help": "Share of tokens chosen for prediction."})
    mask_token: str | None = field(
        default=None,
        metadata={"help": "Token shown at masked positions (one vocabulary token). Unset: the tokenizer's, else '_'."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "Module names that get LoRA (all attention and MLP projections by default)."},
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=32, metadata={"help": "Texts per step (per process)."})
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch texts of similar length: less padding; MNTP scores every text on its own."},
    )
    max_steps: int = field(default=300, metadata={"help": "Optimiser steps."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps."})
    scheduler: Scheduler = field(default=Scheduler.LINEAR, metadata={"help": "LR decay after warm-up."})
    eval_lines: int = field(
        default=256, metadata={"help": "Corpus lines held out for the MNTP loss before/after (0: none)."}
    )
    save_steps: int = field(default=100, metadata={"help": "Checkpoint (LoRA + optimiser) every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init, held-out split, masking and data order."})

    def __post_init__(self) -> None:
        self.check_types()  # also: one string for a list field becomes a list, enum values become members
        for name in ("batch_size", "max_steps", "lora_r", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a target needs a token before it), got {self.max_length}.")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be between 0 and 1 (exclusive), got {self.mask_prob}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        for name in ("lr", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.eval_lines < 0:
            raise ValueError(f"eval_lines must be >= 0, got {self.eval_lines}.")
        if not self.lora_targets:
            raise ValueError(f"lora_targets is empty; name the modules that get LoRA, e.g. {LORA_TARGETS}.")
        if self.mask_token is not None and not self.mask_token:
            raise ValueError("mask_token is an empty string; leave it unset for the default or name a token.")

