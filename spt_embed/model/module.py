"""The sentence-transformers input module: tokenise, splice the soft tokens in, run the frozen backbone, pool."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sentence_transformers.base.modules.input_module import InputModule
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from spt_embed.model.backbone import NAMED_BACKBONES, Backbone, load_backbone
from spt_embed.model.config import CONFIG_NAME, WEIGHTS_KEY, WEIGHTS_NAME, Init, Placement, SuffixPromptConfig
from spt_embed.model.soft_prompt import (
    expand_soft_prompt,
    init_soft_prompt,
    last_token_pool,
    left_pad_position_ids,
    pack_texts,
    splice,
    suffix_position_ids,
    unpack_states,
)

logger = logging.getLogger(__name__)

BACKBONE_SUBDIR = "backbone"


@contextlib.contextmanager
def grouped_query_sdpa():
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


class ForwardPath(str, enum.Enum):
    AUTO = "auto"  # fast path when it is exact and gradients are needed, full pass otherwise
    FULL = "full"  # one pass over [text | soft tokens]
    FAST = "fast"  # text once under no_grad with a KV cache, then only the K soft tokens with gradients


class SuffixPromptModule(InputModule):
    """K trainable soft tokens appended to every text; the frozen backbone's last hidden state is the embedding."""

    config_file_name = CONFIG_NAME
    DEFAULT_PACK_TOKENS = 64
    save_in_root = True

    def __init__(self, backbone: Backbone, config: SuffixPromptConfig, soft_prompt: torch.Tensor | None = None):
        super().__init__()
        hidden = backbone.model.config.hidden_size
        if config.backbone.hidden_size and config.backbone.hidden_size != hidden:
            raise ValueError(
                f"The adapter's soft tokens are {config.backbone.hidden_size} wide but backbone "
                f"{backbone.ref.source!r} has hidden size {hidden}; load the adapter on the backbone it was trained "
                f"for ({config.backbone.source!r})."
            )
        self.spt_config = config
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.backbone_ref = backbone.ref
        if soft_prompt is None:
            text_ids = None
            if config.init is Init.TEXT:
                text_ids = self.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            soft_prompt = init_soft_prompt(
                self.backbone.get_input_embeddings().weight,
                config.num_tokens,
                config.init,
                text_ids=text_ids,
                seed=config.seed,
            )
        expected = (config.num_tokens, hidden)
        if tuple(soft_prompt.shape) != expected:
            raise ValueError(f"Soft prompt has shape {tuple(soft_prompt.shape)}, expected {expected} (K, hidden).")
        device = next(self.backbone.parameters()).device
        self.soft_prompt = torch.nn.Parameter(soft_prompt.detach().to(device=device, dtype=torch.float32).clone())
        self.forward_path = ForwardPath.AUTO
        # Tokens per packed row in the fast path's text pass: attention inside a row costs row_tokens**2, so rows
        # stay short; a text longer than this gets a row of its own.
        self.pack_tokens = self.DEFAULT_PACK_TOKENS
        self.save_backbone = False
        self._logged_path: ForwardPath | None = None
        self._warned_empty = False

    # ----- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | Backbone,
        *,
        num_tokens: int = 16,
        init: Init | str = Init.TEXT,
        init_text: str | None = None,
        placement: Placement | str = Placement.SUFFIX,
        max_length: int = 512,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> SuffixPromptModule:
        kwargs: dict[str, Any] = {}
        if init_text is not None:
            kwargs["init_text"] = init_text
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone, dtype=dtype)
        config = SuffixPromptConfig(
            backbone=backbone.ref,
            num_tokens=num_tokens,
            init=init,
            placement=placement,
            max_length=max_length,
            seed=seed,
            **kwargs,
        )
        return cls(backbone, config)

    # ----- sentence-transformers interface ------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.spt_config.num_tokens

    @property
    def max_seq_length(self) -> int:
        return self.spt_config.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value <= self.num_tokens:
            raise ValueError(f"max_seq_length must exceed the {self.num_tokens} soft tokens, got {value}.")
        self.spt_config.max_length = value

    @property
    def is_causal(self) -> bool:
        return getattr(self.backbone.config, "is_causal", True) is not False

    def get_embedding_dimension(self) -> int:
        return self.backbone.config.hidden_size

    def train(self, mode: bool = True) -> SuffixPromptModule:
        super().train(mode)
        self.backbone.eval()  # the backbone is frozen: no dropout, whatever the trainer asks
        return self

    def preprocess(
        self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor | Any]:
        """Left-padded token ids of the texts, cut to leave room for the K soft tokens.

        An empty string yields no text tokens: its embedding is that of the soft prompt alone (plus any special
        tokens the tokenizer adds), the same vector for every empty input.
        """
        texts = []
        for index, item in enumerate(inputs):
            if not isinstance(item, str):
                raise TypeError(f"Input {index} is {type(item).__name__}, expected str: {item!r:.80}")
            texts.append(prompt + item if prompt else item)
        empty = sum(1 for text in texts if not text)
        if empty:
            # Warn once per module; repeating it for every batch of a large file would bury other messages.
            log = logger.debug if self._warned_empty else logger.warning
            log("%d empty text(s) in this batch: each is encoded from the soft prompt alone.", empty)
            self._warned_empty = True
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_length - self.num_tokens,
            padding_side="left",
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        path = self.resolve_path(input_ids.shape[1])
        with grouped_query_sdpa():
            if path is ForwardPath.FAST:
                hidden = self._fast_forward(input_ids, attention_mask)
            else:
                hidden = self._full_forward(input_ids, attention_mask)
        # fp32 out whatever the backbone's dtype: normalising and FAISS then work at full precision.
        features["sentence_embedding"] = hidden.float()  # (B, H)
        return features

    def resolve_path(self, text_length: int) -> ForwardPath:
        """Which forward pass to run; the fast path is exact only for causal attention and suffix placement."""
        exact = self.is_causal and self.spt_config.placement is Placement.SUFFIX
        if self.forward_path is ForwardPath.FAST and not exact:
            raise ValueError(
                "The fast path needs a causal backbone and suffix placement (otherwise the text's hidden states "
                "depend on the soft tokens); use forward_path='full' or 'auto'."
            )
        wants_grad = torch.is_grad_enabled() and self.soft_prompt.requires_grad
        if self.forward_path is ForwardPath.AUTO:
            path = ForwardPath.FAST if exact and wants_grad else ForwardPath.FULL
        else:
            path = self.forward_path
        if text_length == 0:  # nothing to cache: every text in the batch is empty
            path = ForwardPath.FULL
        if wants_grad and path is not self._logged_path:
            if path is ForwardPath.FAST:
                reason = "causal backbone + suffix: text once under no_grad with a KV cache"
            elif not self.is_causal:
                reason = "the backbone attends bidirectionally, so the text's states depend on the soft tokens"
            elif self.spt_config.placement is not Placement.SUFFIX:
                reason = "prefix placement: the text's states depend on the soft tokens"
            elif self.forward_path is ForwardPath.FULL:
                reason = "forward_path='full' was asked for"
            else:
                reason = "a batch of empty texts: nothing to cache"
            logger.info("Training forward path: %s (%s)", path.value, reason)
            self._logged_path = path
        return path

    def _full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text_embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, L, H)
        embeds, mask = splice(text_embeds, attention_mask, self.soft_prompt, self.spt_config.placement)  # (B, L+K, H)
        out = self.backbone(
            inputs_embeds=embeds, attention_mask=mask, position_ids=left_pad_position_ids(mask), use_cache=False
        )
        return last_token_pool(out.last_hidden_state)  # (B, H)

    def _fast_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Under causal attention the soft tokens cannot change the text's hidden states, so the text needs no
        # graph: run it once without gradients, keep its keys/values, then run only the K soft tokens on top.
        # The text pass packs the batch's texts into a few rows (a random training batch is about half padding
        # otherwise); the soft pass then runs over the whole batch at once on the unpacked keys/values.
        packed, positions, index = pack_texts(input_ids, attention_mask, self.pack_tokens, self.tokenizer.pad_token_id)
        dtype = self.backbone.get_input_embeddings().weight.dtype
        with torch.no_grad():
            # Each packed text attends only to itself: transformers builds that block-causal mask from position ids
            # that restart at 0, but only without a cache, so build it here and hand it over ready-made.
            shape_only = torch.empty(*packed.shape, 0, dtype=dtype, device=packed.device)  # (R, C, 0)
            block_mask = create_causal_mask(self.backbone.config, shape_only, None, None, position_ids=positions)
            text_out = self.backbone(input_ids=packed, position_ids=positions, attention_mask=block_mask, use_cache=True)
        cache = DynamicCache(
            ddp_cache_data=[(unpack_states(k, index), unpack_states(v, index)) for k, v, *_ in text_out.past_key_values],
            config=self.backbone.config,
        )
        batch = input_ids.shape[0]
        soft = expand_soft_prompt(self.soft_prompt, batch, dtype)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, self.num_tokens)], dim=1)  # (B, L+K)
        out = self.backbone(
            inputs_embeds=soft,
            attention_mask=full_mask,
            position_ids=suffix_position_ids(attention_mask, self.num_tokens),
            past_key_values=cache,
            use_cache=True,
        )
        return last_token_pool(out.last_hidden_state)  # (B, H)

    # ----- persistence --------------------------------------------------------------------------------------

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the soft tokens (safetensors) and spt_config.json; the backbone only if `save_backbone`."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({WEIGHTS_KEY: self.soft_prompt.detach().float().cpu().contiguous()}, str(out / WEIGHTS_NAME))
        config = SuffixPromptConfig(**{**self.spt_config.to_dict(), "backbone": self.backbone_ref})
        if self.save_backbone:
            self.backbone.save_pretrained(out / BACKBONE_SUBDIR)
            self.tokenizer.save_pretrained(out / BACKBONE_SUBDIR)
            config.backbone = type(self.backbone_ref)(**{**vars(self.backbone_ref), "source": BACKBONE_SUBDIR})
        config.save(out)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SuffixPromptModule:
        """Load an adapter folder. `model_kwargs` may carry `backbone` (override where the backbone comes from),
        `allow_backbone_mismatch` (skip the fingerprint check) and `dtype`."""
        options = dict(model_kwargs or {})
        folder = Path(model_name_or_path) / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"Adapter folder {folder} does not exist (spt-embed loads local folders only).")
        config = SuffixPromptConfig.load(folder)
        source = options.get("backbone")
        if source is None:
            source = config.backbone.source
            # A self-contained folder names its backbone relative to itself ("backbone").
            if source not in NAMED_BACKBONES and not Path(source).is_absolute():
                source = folder / source
        backbone = load_backbone(source, dtype=options.get("dtype", torch.float32))
        if backbone.ref.hidden_size != config.backbone.hidden_size:
            raise ValueError(
                f"Adapter {folder} was trained on a backbone with hidden size {config.backbone.hidden_size}, but "
                f"{source} has {backbone.ref.hidden_size}. Load it on its own backbone ({config.backbone.source!r})."
            )
        if backbone.ref.fingerprint != config.backbone.fingerprint:
            message = (
                f"Adapter {folder} was trained on backbone {config.backbone.source!r} (fingerprint "
                f"{config.backbone.fingerprint}) but {source} has fingerprint {backbone.ref.fingerprint}: its soft "
                f"tokens will not mean the same there. Load it on the backbone it was trained on"
            )
            if not options.get("allow_backbone_mismatch"):
                raise ValueError(message + ", or pass allow_backbone_mismatch=True to load anyway.")
            logger.warning("%s; loading anyway (allow_backbone_mismatch=True).", message)
        return cls(backbone, config, _read_soft_prompt(folder / WEIGHTS_NAME))


def _read_soft_prompt(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter folder has a config but no soft-token weights.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is corrupted or not a safetensors file ({exc}); re-save or retrain the adapter.")
    if WEIGHTS_KEY not in tensors:
        raise ValueError(f"{path} has no tensor {WEIGHTS_KEY!r} (found {sorted(tensors)}); the file is corrupted.")
    return tensors[WEIGHTS_KEY]
