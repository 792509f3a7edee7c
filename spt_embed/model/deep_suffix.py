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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from spt_embed.model.backbone import Backbone
from spt_embed.model.config import LAYER_OFFSETS_KEY, AdapterMethod, SuffixPromptConfig
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
    ):
        super().__init__(backbone, config, soft_prompt, layer_weights, task_prompts)
        layers = decoder_layers(self.backbone)
        shape = (len(layers), config.num_tokens, self.backbone.config.hidden_size)
        if layer_offsets is None:
            layer_offsets = torch.zeros(shape)  # the start is exactly the shallow suffix
        if tuple(layer_offsets.shape) != shape:
            raise ValueError(
                f"Deep-suffix offsets have shape {tuple(layer_offsets.shape)}, expected {shape} (layers, K, hidden). "
                f"Load the adapter on the backbone it was trained for ({config.backbone.source!r})."
            )
        device = self.soft_prompt.device
        self.layer_offsets = torch.nn.Parameter(layer_offsets.detach().to(device=device, dtype=torch.float32).clone())
        self._in_soft_pass = False
        for index, layer in enumerate(layers):
            layer.register_forward_hook(self._offset_hook(index))

    def _offset_hook(self, index: int):
        def hook(layer: torch.nn.Module, args: Any, output: Any) -> Any:
            if not self._in_soft_pass:
                return None
            if isinstance(output, tuple):
                return (offset_soft_positions(output[0], self.layer_offsets[index]), *output[1:])
            return offset_soft_positions(output, self.layer_offsets[index])

        return hook

    @contextlib.contextmanager
    def soft_scope(self) -> Iterator[None]:
        self._in_soft_pass = True
        try:
            yield
        finally:
            self._in_soft_pass = False

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), LAYER_OFFSETS_KEY: self.layer_offsets}

    @classmethod
    def expected_tensors(cls, config: SuffixPromptConfig) -> set[str]:
        return super().expected_tensors(config) | {LAYER_OFFSETS_KEY}
