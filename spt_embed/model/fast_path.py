"""The suffix prompt's fast forward path: the text once under no_grad with a KV cache, then only the K soft tokens.

Under causal attention the soft tokens after a text cannot change the text's hidden states, so the text needs no
graph: it runs once without gradients, its keys/values are kept, and only the K soft tokens run on top of them
with gradients. The text pass packs the batch's texts into a few rows (a random training batch is about half
padding otherwise); the soft pass then runs over the whole batch at once on the unpacked keys/values. The soft
pass's states, of every layer when asked, are those of the K soft positions in the full pass over [text | soft
tokens], so every readout (last position, soft-position mean, layer mix) reads the same embedding from it
(tests/test_encoder.py, tests/test_readout_template.py), for a fraction of the backward cost.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import Callable

import torch
from torch.profiler import record_function
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from spt_embed.model.soft_prompt import expand_soft_prompt, pack_texts, suffix_position_ids, unpack_states


class ForwardPath(str, enum.Enum):
    AUTO = "auto"  # fast path when it is exact and gradients are needed, full pass otherwise
    FULL = "full"  # one pass over [text | soft tokens]
    FAST = "fast"  # text once under no_grad with a KV cache, then only the K soft tokens with gradients


def fast_forward(
    backbone: torch.nn.Module,
    soft_prompt: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    pack_tokens: int,
    pad_token_id: int,
    output_hidden_states: bool = False,
    soft_scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    recompute_mlp: bool = False,
) -> BaseModelOutputWithPast:
    """The backbone's output over the K soft tokens after left-padded `input_ids` (B, L) on a causal backbone:
    `last_hidden_state` (B, K, H) and, with `output_hidden_states`, the K positions' states of every layer.

    `pack_tokens`: tokens per packed row of the text pass (a longer text gets a row of its own).
    `soft_scope`: entered around the soft pass only (where a deep suffix's per-layer hooks act).
    `recompute_mlp`: the soft pass's SiLU-gated MLPs keep only their input for backward and recompute gate and up
    there (less memory, more time; see `lean_gated_mlps`)."""
    packed, positions, index = pack_texts(input_ids, attention_mask, pack_tokens, pad_token_id)
    dtype = backbone.get_input_embeddings().weight.dtype
    # The record_function scopes name the three parts in a torch.profiler trace (train/profile_step.py).
    with torch.no_grad(), record_function("spt_embed.fast_path.text_pass"):
        # Each packed text attends only to itself: transformers builds that block-causal mask from position ids
        # that restart at 0, but only without a cache, so build it here and hand it over ready-made.
        shape_only = torch.empty(*packed.shape, 0, dtype=dtype, device=packed.device)  # (R, C, 0)
        block_mask = create_causal_mask(backbone.config, shape_only, None, None, position_ids=positions)
        text_out = backbone(input_ids=packed, position_ids=positions, attention_mask=block_mask, use_cache=True)
    cache_arg = _cache_argument(backbone)
    with record_function("spt_embed.fast_path.unpack"):
        cache = DynamicCache(
            ddp_cache_data=[(unpack_states(k, index), unpack_states(v, index)) for k, v, *_ in text_out[cache_arg]],
            config=backbone.config,
        )
    batch, num_tokens = input_ids.shape[0], soft_prompt.shape[0]
    soft = expand_soft_prompt(soft_prompt, batch, dtype)  # (B, K, H)
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, num_tokens)], dim=1)  # (B, L+K)
    lean = lean_gated_mlps(backbone, recompute=recompute_mlp)
    with soft_scope(), lean, record_function("spt_embed.fast_path.soft_pass"):
        return backbone(
            inputs_embeds=soft,
            attention_mask=full_mask,
            position_ids=suffix_position_ids(attention_mask, num_tokens),
            use_cache=True,
            output_hidden_states=output_hidden_states,
            **{cache_arg: cache},
        )


def _cache_argument(backbone: torch.nn.Module) -> str:
    """The name under which `backbone.forward` takes (and its output returns) the KV cache: `cache` in current
    transformers, where the older `past_key_values` still works but warns on every call; older releases know only
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _silu_gate_grads(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of silu(gate) * up with respect to gate and up, from the output's gradient `grad`: through
    aten's fused silu_backward, the kernel autograd's own SiLU uses. (Written out as sigmoid, products and sums it
    took eight elementwise passes over (B, K, intermediate) tensors, about a quarter of the fast step's backward by
    train/profile_step.py; this is four.)"""
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    return grad_gate, torch.nn.functional.silu(gate).mul_(grad)


class _SiLUGate(torch.autograd.Function):
    """silu(gate) * up that keeps only `gate` and `up` for backward (autograd's silu-then-multiply also keeps
    silu(gate)): one (B, K, intermediate) tensor fewer per layer, the sigmoid recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return _silu_gate_grads(grad, gate, up)


class _RecomputedSiLUGate(torch.autograd.Function):
    """silu(x W_gate^T + b) * (x W_up^T + b) from the MLP's input `x` that keeps only `x` for backward and recomputes
    gate and up there: (B, K, hidden) saved per layer instead of two (B, K, intermediate), for one more pair of
    gate/up products of the K soft tokens. Only for frozen plain `nn.Linear` projections: their weights get no
    gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.projections = gate_proj, up_proj
        # backward runs outside the forward's autocast (--bf16): recompute under the same one.
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(x.device.type)
        return torch.nn.functional.silu(gate_proj(x)) * up_proj(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        gate_proj, up_proj = ctx.projections
        # Under the forward's autocast, if any, as autograd would: gate and up as the forward computed them, each
        # product's input gradient in the autocast dtype, cast to x's dtype before they are summed.
        with torch.no_grad(), torch.autocast(x.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            gate, up = gate_proj(x), up_proj(x)
            grad_gate, grad_up = _silu_gate_grads(grad, gate, up)
            from_gate, from_up = grad_gate @ gate_proj.weight, grad_up @ up_proj.weight
        return from_gate.to(x.dtype) + from_up.to(x.dtype), None, None


def _recomputable(mlp: torch.nn.Module) -> bool:
    """gate_proj and up_proj are plain, frozen `nn.Linear` layers (not LoRA-wrapped, not quantised)."""
    return all(type(getattr(mlp, name)) is torch.nn.Linear and not getattr(mlp, name).weight.requires_grad
               and (getattr(mlp, name).bias is None or not getattr(mlp, name).bias.requires_grad)
               for name in ("gate_proj", "up_proj"))


def _is_silu_gated_mlp(mlp: torch.nn.Module) -> bool:
    """Llama / Qwen2 / Mistral's MLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""
    return (all(isinstance(getattr(mlp, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


@contextlib.contextmanager
def lean_gated_mlps(backbone: torch.nn.Module, recompute: bool = False):
    """While gradients are recorded, every SiLU-gated MLP of `backbone` (Llama, Qwen2, Mistral) runs its gate through
    `_SiLUGate`, which saves a third less of the soft pass's largest activations; any other MLP is left alone.
    With `recompute`, an MLP whose gate and up projections are frozen plain linears runs `_RecomputedSiLUGate`
    instead, which saves only the MLP's input (hidden wide, not 2 x intermediate) and recomputes gate and up in
    backward."""
    if not torch.is_grad_enabled():
        yield
        return
    # A module whose forward is already an instance attribute (an accelerate hook, say) is left alone.
    patched = [module for module in backbone.modules() if _is_silu_gated_mlp(module) and "forward" not in vars(module)]
    for mlp in patched:
        if recompute and _recomputable(mlp):
            mlp.forward = (lambda m: lambda x: m.down_proj(_RecomputedSiLUGate.apply(x, m.gate_proj, m.up_proj)))(mlp)
        else:
            mlp.forward = (lambda m: lambda x: m.down_proj(_SiLUGate.apply(m.gate_proj(x), m.up_proj(x))))(mlp)
    try:
        yield
    finally:
        for mlp in patched:
            del mlp.forward  # the class's forward again
