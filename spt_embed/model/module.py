"""The suffix prompt as a sentence-transformers input module (method='suffix'; method='prompt' is the same module
with the soft tokens before the text, placement='prefix'): tokenise, splice the soft tokens in, run the frozen
backbone, read the embedding out (the readouts are in soft_prompt.py). The fast forward path for training lives in
fast_path.py, what every backbone method shares in base.py."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from spt_embed.atomic import atomic_file
from spt_embed.model.backbone import Backbone, load_backbone
from spt_embed.model.base import BackboneModule, grouped_query_sdpa
from spt_embed.model.config import (
    CONFIG_NAME,
    KV_OFFSETS_KEY,
    LAYER_OFFSETS_KEY,
    LAYER_WEIGHTS_KEY,
    AdapterMethod,
    WEIGHTS_KEY,
    WEIGHTS_NAME,
    Init,
    Placement,
    Readout,
    SuffixPromptConfig,
    task_weights_key,
)
from spt_embed.model.fast_path import ForwardPath, fast_forward
from spt_embed.model.soft_prompt import (
    init_layer_weights,
    init_soft_prompt,
    left_align,
    left_pad_position_ids,
    pool,
    splice,
)

logger = logging.getLogger(__name__)

class SuffixPromptModule(BackboneModule):
    """K trainable soft tokens appended to every text; the frozen backbone's hidden states, read out as the config's
    `readout` says, are the embedding. With readout='layer-mix' the per-layer weights train too.

    With `config.tasks` (e.g. query and document) the module holds one more set of K soft tokens per task, all on
    the same backbone: a text preprocessed under task T (sentence-transformers' `encode_query` / `encode_document`,
    or a training column routed by `router_mapping`) goes through T's tokens, every other text through the default
    ones."""

    config_file_name = CONFIG_NAME
    method = AdapterMethod.SUFFIX  # what from_backbone builds unless told otherwise
    DEFAULT_PACK_TOKENS = 64
    folder_kind = "Adapter"
    mismatch_hint = "its soft tokens will not mean the same there. Load it on the backbone it was trained on"
    # sentence-transformers hands `task` to forward() (encode_query / encode_document, the GradCache loss); the same
    # task also reaches preprocess(), which records it in the features for the paths that do not pass it.
    forward_kwargs = {"task"}

    def __init__(
        self,
        backbone: Backbone,
        config: SuffixPromptConfig,
        soft_prompt: torch.Tensor | None = None,
        layer_weights: torch.Tensor | None = None,
        task_prompts: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(backbone)
        if config.method is not self.method:
            raise ValueError(
                f"{type(self).__name__} is the module of method {self.method.value!r}, but the config says "
                f"{config.method.value!r}; build it with adapter_class(config.method) (spt_embed.model.module)."
            )
        hidden = backbone.model.config.hidden_size
        if config.backbone.hidden_size and config.backbone.hidden_size != hidden:
            raise ValueError(
                f"The adapter's soft tokens are {config.backbone.hidden_size} wide but backbone "
                f"{backbone.ref.source!r} has hidden size {hidden}; load the adapter on the backbone it was trained "
                f"for ({config.backbone.source!r})."
            )
        self.spt_config = config
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
        if task_prompts is None:  # fresh: every task starts from the default prompt's init
            task_prompts = {task: soft_prompt for task in config.tasks}
        if sorted(task_prompts) != sorted(config.tasks):
            raise ValueError(
                f"Task soft prompts {sorted(task_prompts)} were given, but the config names the tasks "
                f"{sorted(config.tasks)}; the adapter folder is inconsistent: re-save or retrain it."
            )
        for task, tensor in task_prompts.items():
            if tuple(tensor.shape) != expected:
                raise ValueError(f"Task {task!r} soft prompt has shape {tuple(tensor.shape)}, expected {expected}.")
        # In the config's order, so that saving and hashing see the tasks in a fixed order.
        self.task_prompts = torch.nn.ParameterDict(
            {
                task: torch.nn.Parameter(task_prompts[task].detach().to(device=device, dtype=torch.float32).clone())
                for task in config.tasks
            }
        )
        self.layer_weights: torch.nn.Parameter | None = None
        if config.readout is Readout.LAYER_MIX:
            # One weight per entry of the backbone's `hidden_states` (output_hidden_states=True): the embedding
            # output, the residual stream after each decoder layer but the last (no final norm), and, last, the
            # final layer's output after the final norm, which is `last_hidden_state`, where the mix starts.
            num_states = self.backbone.config.num_hidden_layers + 1
            if layer_weights is None:
                layer_weights = init_layer_weights(num_states)
            if tuple(layer_weights.shape) != (num_states,):
                raise ValueError(
                    f"Layer-mix weights have shape {tuple(layer_weights.shape)}, expected ({num_states},): one per "
                    f"layer of the backbone plus its embedding output. Load the adapter on the backbone it was "
                    f"trained for ({config.backbone.source!r})."
                )
            self.layer_weights = torch.nn.Parameter(layer_weights.detach().to(device=device, dtype=torch.float32))
        elif layer_weights is not None:
            raise ValueError(f"Layer-mix weights were given, but the readout is {config.readout.value!r}.")
        self.forward_path = ForwardPath.AUTO
        # Tokens per packed row in the fast path's text pass: attention inside a row costs row_tokens**2, so rows
        # stay short; a text longer than this gets a row of its own.
        self.pack_tokens = self.DEFAULT_PACK_TOKENS
        # The fast path's soft pass recomputes its MLPs' gate and up in backward instead of keeping them: less
        # memory per training step, more time (training's `recompute_mlp`).
        self.recompute_mlp = False
        self._logged_path: ForwardPath | None = None
        self._warned_empty = False
        # The config's tail as token ids, tokenized apart from the texts, and the special tokens the tokenizer puts
        # after a text: preprocess() keeps both whole when it cuts a text.
        self._tail_ids = self.tokenizer(config.tail, add_special_tokens=False)["input_ids"] if config.tail else []
        self._appended_specials = self.appended_specials() if config.tail else 0

    # ----- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls, backbone: str | os.PathLike | Backbone, *, dtype: torch.dtype = torch.float32, **config: Any
    ) -> SuffixPromptModule:
        """A fresh module on `backbone` (a spec, loaded in `dtype`, or a loaded Backbone). `config`: fields of
        SuffixPromptConfig (num_tokens, init, init_text, placement, tail, max_length, readout, method, deep_offsets,
        tasks, task_max_length, seed); None keeps a default. The method picks the class (deep-suffix:
        `DeepSuffixModule`)."""
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone, dtype=dtype)
        given = {name: value for name, value in config.items() if value is not None}
        given.setdefault("method", cls.method)
        spt_config = SuffixPromptConfig(backbone=backbone.ref, **given)
        return adapter_class(spt_config.method)(backbone, spt_config)

    # ----- sentence-transformers interface ------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.spt_config.num_tokens

    @property
    def readout(self) -> Readout:
        return self.spt_config.readout

    @property
    def max_seq_length(self) -> int:
        return self.spt_config.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value <= self.num_tokens:
            raise ValueError(f"max_seq_length must exceed the {self.num_tokens} soft tokens, got {value}.")
        self.spt_config.max_length = value

    def train(self, mode: bool = True) -> SuffixPromptModule:
        super().train(mode)
        self.backbone.eval()  # the backbone is frozen: no dropout, whatever the trainer asks
        return self

    @property
    def task_names(self) -> list[str]:
        """The tasks with soft prompts of their own (besides the default), in the config's order."""
        return list(self.spt_config.tasks)

    def soft_prompt_for(self, task: str | None) -> torch.Tensor:
        """The soft tokens (K, H) a text of `task` goes through: the task's own, else the default prompt's."""
        if task is not None and task in self.task_prompts:
            return self.task_prompts[task]
        return self.soft_prompt

    def max_length_for(self, task: str | None) -> int:
        """Maximum sequence length (soft tokens included) for a text of `task`."""
        return self.spt_config.task_max_length.get(task, self.max_seq_length) if task else self.max_seq_length

    def preprocess(
        self,
        inputs: Sequence[str],
        prompt: str | None = None,
        task: str | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor | Any]:
        """Left-padded token ids of the texts, cut to leave room for the K soft tokens: to the task's maximum
        length (`task_max_length`), or `max_length` where the caller gives one (a training collator's override).

        A `tail` in the config follows every text and is kept whole when the text is cut. An empty string yields no
        text tokens: its embedding is that of the soft prompt alone (plus the tail and any special tokens the
        tokenizer adds), the same vector for every empty input. The task, when given, is kept in the
        features so that forward() picks its soft prompt whichever way it is called.
        """
        limit = max_length or self.max_length_for(task)
        if limit <= self.num_tokens:
            raise ValueError(f"max_length must exceed the {self.num_tokens} soft tokens, got {limit}.")
        texts = [prompt + text if prompt else text for text in self.check_texts(inputs)]
        empty = sum(1 for text in texts if not text)
        if empty:
            # Warn once per module; repeating it for every batch of a large file would bury other messages.
            log = logger.debug if self._warned_empty else logger.warning
            log("%d empty text(s) in this batch: each is encoded from the soft prompt alone.", empty)
            self._warned_empty = True
        if self.spt_config.tail:
            encoded = self._with_tail(texts, limit - self.num_tokens)
        else:
            encoded = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=limit - self.num_tokens,
                padding_side="left",
                return_tensors="pt",
            )
        features: dict[str, Any] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if task is not None:
            features["task"] = task
        return features

    def _with_tail(self, texts: list[str], limit: int) -> dict[str, torch.Tensor]:
        """Token ids of each text followed by the config's `tail` (tokenized apart, before any special token the
        tokenizer appends), the text cut so that the row fits in `limit` tokens with the tail whole; left-padded."""
        tail, appended = self._tail_ids, self._appended_specials
        if limit - len(tail) - appended < 1:
            raise ValueError(
                f"tail {self.spt_config.tail!r} takes {len(tail)} tokens, which with the {self.num_tokens} soft "
                f"tokens leaves no room for text in max_length {limit + self.num_tokens}; raise max_length or "
                f"shorten the tail."
            )
        rows = [
            ids[: len(ids) - appended] + tail + ids[len(ids) - appended :]
            for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        ]
        rows = self.cut_keeping_end(rows, limit, len(tail) + appended)
        return self.left_pad(rows)

    def forward(
        self, features: dict[str, torch.Tensor], task: str | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        # Left-padded, as preprocess() made it, even where a loss joined columns with padding on the right.
        input_ids, attention_mask = left_align(features["input_ids"], features["attention_mask"])
        soft_prompt = self.soft_prompt_for(task if task is not None else features.get("task"))
        path = self.resolve_path(input_ids.shape[1], soft_prompt)
        all_layers = self.readout is Readout.LAYER_MIX
        with grouped_query_sdpa():
            if path is ForwardPath.FAST:
                out = fast_forward(
                    self.backbone,
                    soft_prompt,
                    input_ids,
                    attention_mask,
                    pack_tokens=self.pack_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    output_hidden_states=all_layers,
                    soft_scope=self.soft_scope,
                    recompute_mlp=self.recompute_mlp,
                )
            else:
                with self.soft_scope():
                    out = self._full_forward(
                        input_ids, attention_mask, soft_prompt, output_hidden_states=all_layers
                    )
        hidden = pool(
            self.readout,
            out.last_hidden_state,
            out.hidden_states,
            num_tokens=self.num_tokens,
            placement=self.spt_config.placement,
            layer_weights=self.layer_weights,
        )  # (B, H)
        # fp32 out whatever the backbone's dtype: normalising and FAISS then work at full precision.
        features["sentence_embedding"] = hidden.float()  # (B, H)
        return features

    def soft_scope(self) -> contextlib.AbstractContextManager:
        """Entered around each backbone pass that runs the soft tokens (the full pass, or the fast path's soft
        pass, never its text pass): where a method's own hooks act. Nothing here."""
        return contextlib.nullcontext()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter trains, by its key in the weights file: the soft tokens (the default prompt's and every
        task's) and, for layer-mix, the layer weights."""
        tensors = {WEIGHTS_KEY: self.soft_prompt}
        tensors.update({task_weights_key(task): tensor for task, tensor in self.task_prompts.items()})
        if self.layer_weights is not None:
            tensors[LAYER_WEIGHTS_KEY] = self.layer_weights
        return tensors

    def resolve_path(self, text_length: int, soft_prompt: torch.Tensor | None = None) -> ForwardPath:
        """Which forward pass to run; the fast path is exact only for causal attention and suffix placement.
        `soft_prompt`: the tokens this batch goes through (the default prompt if None)."""
        exact = self.is_causal and self.spt_config.placement is Placement.SUFFIX
        if self.forward_path is ForwardPath.FAST and not exact:
            raise ValueError(
                "The fast path needs a causal backbone and suffix placement (otherwise the text's hidden states "
                "depend on the soft tokens); use forward_path='full' or 'auto'."
            )
        soft_prompt = self.soft_prompt if soft_prompt is None else soft_prompt
        wants_grad = torch.is_grad_enabled() and soft_prompt.requires_grad
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

    def _full_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        soft_prompt: torch.Tensor | None = None,
        *,
        output_hidden_states: bool,
    ):
        """The backbone's output over the spliced sequence (B, L+K, H); every layer's states too if asked.
        `soft_prompt`: the tokens to splice in (the default prompt if None)."""
        soft_prompt = self.soft_prompt if soft_prompt is None else soft_prompt
        text_embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, L, H)
        embeds, mask = splice(text_embeds, attention_mask, soft_prompt, self.spt_config.placement)  # (B, L+K, H)
        return self.backbone(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=left_pad_position_ids(mask),
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )

    # ----- persistence --------------------------------------------------------------------------------------

    def save(
        self,
        output_path: str,
        *args: Any,
        safe_serialization: bool = True,
        include_backbone: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write the soft tokens (and the layer-mix weights, if any) as safetensors and spt_config.json; with
        `include_backbone` the backbone too, in backbone/, which the config then names."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        # Through atomic_file, not safetensors' save_file: whole or absent, and readable as the umask allows
        # (save_file creates its file 0600).
        tensors = self.adapter_tensors()
        with atomic_file(out / WEIGHTS_NAME, "wb") as handle:
            handle.write(safetensors_bytes({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}))
        ref = self.write_backbone(out) if include_backbone else self.backbone_ref
        SuffixPromptConfig(**{**self.spt_config.to_dict(), "backbone": ref}).save(out)

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
        backbone = cls.load_saved_backbone(folder, config.backbone, options)
        tensors = _read_weights(folder / WEIGHTS_NAME)
        # The config's method, not the class modules.json names, decides (both load either kind of folder).
        module_class = adapter_class(config.method)
        expected = module_class.expected_tensors(config)
        if set(tensors) != expected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} holds the tensors {sorted(tensors)}, but {folder / CONFIG_NAME} "
                f"(method={config.method.value!r}, readout={config.readout.value!r}) needs {sorted(expected)}; the "
                f"adapter folder is inconsistent: re-save or retrain it."
            )
        arguments = {ARGUMENT_OF[key]: tensors[key] for key in expected if key in ARGUMENT_OF}
        if config.tasks:
            arguments["task_prompts"] = {task: tensors[task_weights_key(task)] for task in config.tasks}
        return module_class(backbone, config, **arguments)

    @classmethod
    def expected_tensors(cls, config: SuffixPromptConfig) -> set[str]:
        """The keys an adapter's weights file holds under `config`."""
        keys = {WEIGHTS_KEY} | {task_weights_key(task) for task in config.tasks}
        return keys | ({LAYER_WEIGHTS_KEY} if config.readout is Readout.LAYER_MIX else set())


def adapter_class(method: AdapterMethod) -> type[SuffixPromptModule]:
    """The module class of an adapter method."""
    if method is AdapterMethod.DEEP_SUFFIX:
        from spt_embed.model.deep_suffix import DeepSuffixModule

        return DeepSuffixModule
    return SuffixPromptModule


# The constructor argument each weights-file key is given to.
ARGUMENT_OF = {WEIGHTS_KEY: "soft_prompt", LAYER_WEIGHTS_KEY: "layer_weights", LAYER_OFFSETS_KEY: "layer_offsets",
               KV_OFFSETS_KEY: "kv_offsets"}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter folder has a config but no soft-token weights.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is corrupted or not a safetensors file ({exc}); re-save or retrain the adapter.")
    if WEIGHTS_KEY not in tensors:
        raise ValueError(f"{path} has no tensor {WEIGHTS_KEY!r} (found {sorted(tensors)}); the file is corrupted.")
    return tensors
