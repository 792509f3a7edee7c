"""The deep suffix: the K soft tokens plus, after every decoder layer, a trained offset to the states at the K soft
positions (method='deep-suffix').

A shallow suffix trains only the layer-0 input of the K positions; every later layer's state there is whatever the
frozen layers make of it. The deep suffix adds a trained (K, H) offset to each decoder layer's output at those
positions, as P-tuning v2 gives every layer its own prompt, for K x H x (N + 1) trained numbers in all (about 286k on
SmolLM2 at K = 16, 0.2 % of the backbone).

The offsets touch only the soft positions. Under causal attention the text before them never sees them, so the fast
path (text once under no_grad, then the soft tokens alone) stays exact. The offsets go in through forward hooks on
the backbone's own decoder layers, whatever their architecture (Llama, Qwen2, Mistral, ...); they act only inside
`soft_scope`, the passes that run the soft tokens, never in the fast path's text pass. At zero (the start) the
module is exactly the shallow suffix.

With `deep_offsets='kv'` the offsets act instead on the keys and values that each layer's attention computes at the
K soft positions (forward hooks on its `k_proj` / `v_proj`, before the rotary embedding): the P-tuning v2 form of a
per-layer prompt, K x 2 x key/value width numbers a layer (184,320 on SmolLM2 at K = 16, with its 3 key/value heads
of 64). The queries and the residual stream at those positions are left to the frozen layers. Same exactness, same
zero start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from spt_embed.model.backbone import Backbone
from spt_embed.model.config import KV_OFFSETS_KEY, LAYER_OFFSETS_KEY, AdapterMethod, DeepOffsets, SuffixPromptConfig
from spt_embed.model.module import SuffixPromptModule


def decoder_layers(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's stack of decoder layers: the first ModuleList with one entry per hidden layer."""
    count = backbone.config.num_hidden_layers
    for module in backbone.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(
        f"{type(backbone).__name__} has no list of {count} decoder layers (config.num_hidden_layers) to hook the "
        f"deep suffix's offsets into; use method='suffix' with this backbone."
    )


def key_value_projections(layer: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The (k_proj, v_proj) linear layers of a decoder layer's attention (Llama, Qwen2, Mistral, ...)."""
    found = {}
    for name, module in layer.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("k_proj", "v_proj") and isinstance(getattr(module, "out_features", None), int):
            if last in found:
                found = {}
                break
            found[last] = module
    if set(found) != {"k_proj", "v_proj"}:
        raise ValueError(
            f"{type(layer).__name__} has no single k_proj / v_proj pair to offset the soft positions' keys and "
            f"values in; use deep_offsets='states' with this backbone."
        )
    return found["k_proj"], found["v_proj"]


def offset_soft_positions(states: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """`states` (B, S, H) with `offset` (K, H) added at the last K positions, where the soft tokens are (all S of them
    in the fast path's soft pass)."""
    num_tokens = offset.shape[0]
    offset = offset.to(states.dtype)
    if states.shape[1] == num_tokens:
        return states + offset
    return torch.cat([states[:, :-num_tokens], states[:, -num_tokens:] + offset], dim=1)


class DeepSuffixModule(SuffixPromptModule):
    """A suffix prompt whose K soft positions also get a trained offset after every decoder layer."""

    folder_kind = "Deep-suffix adapter"
    method = AdapterMethod.DEEP_SUFFIX

    def __init__(
        self,
        backbone: Backbone,
        config: SuffixPromptConfig,
        soft_prompt: torch.Tensor | None = None,
        layer_weights: torch.Tensor | None = None,
        layer_offsets: torch.Tensor | None = None,
        task_prompts: dict[str, torch.Tensor] | None = None,
        kv_offsets: torch.Tensor | None = None,
    ):
        super().__init__(backbone, config, soft_prompt, layer_weights, task_prompts)
        layers = decoder_layers(self.backbone)
        self._in_soft_pass = False
        if config.deep_offsets is DeepOffsets.KV:
            projections = [key_value_projections(layer) for layer in layers]
            width = projections[0][0].out_features
            shape = (len(layers), 2, config.num_tokens, width)
            self.kv_offsets = self._offsets(kv_offsets, shape, "(layers, key/value, K, key/value width)")
            for index, pair in enumerate(projections):
                for side, projection in enumerate(pair):
                    projection.register_forward_hook(self._offset_hook(lambda i=index, j=side: self.kv_offsets[i, j]))
        else:
            shape = (len(layers), config.num_tokens, self.backbone.config.hidden_size)
            self.layer_offsets = self._offsets(layer_offsets, shape, "(layers, K, hidden)")
            for index, layer in enumerate(layers):
                layer.register_forward_hook(self._offset_hook(lambda i=index: self.layer_offsets[i]))

    def _offsets(self, given: torch.Tensor | None, shape: tuple[int, ...], layout: str) -> torch.nn.Parameter:
        """The trained offsets: `given` (from a saved adapter) or zeros, so that the start is the shallow suffix."""
        if given is None:
            given = torch.zeros(shape)
        if tuple(given.shape) != shape:
            raise ValueError(
                f"Deep-suffix offsets have shape {tuple(given.shape)}, expected {shape} {layout}. Load the adapter "
                f"on the backbone it was trained for ({self.spt_config.backbone.source!r})."
            )
        return torch.nn.Parameter(given.detach().to(device=self.soft_prompt.device, dtype=torch.float32).clone())

    def _offset_hook(self, offset: Callable[[], torch.Tensor]):
        """A forward hook that adds `offset()` (K, width) to its module's output at the soft positions, inside
        `soft_scope` only."""

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if not self._in_soft_pass:
                return None
            if isinstance(output, tuple):
                return (offset_soft_positions(output[0], offset()), *output[1:])
            return offset_soft_positions(output, offset())

        return hook

    @contextlib.contextmanager
    def soft_scope(self) -> Iterator[None]:
        self._in_soft_pass = True
        try:
            yield
        finally:
            self._in_soft_pass = False

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        if self.spt_config.deep_offsets is DeepOffsets.KV:
            return {**super().adapter_tensors(), KV_OFFSETS_KEY: self.kv_offsets}
        return {**super().adapter_tensors(), LAYER_OFFSETS_KEY: self.layer_offsets}

    @classmethod
    def expected_tensors(cls, config: SuffixPromptConfig) -> set[str]:
        return super().expected_tensors(config) | {
            KV_OFFSETS_KEY if config.deep_offsets is DeepOffsets.KV else LAYER_OFFSETS_KEY
        }
