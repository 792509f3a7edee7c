"""Pure-torch pieces of a suffix prompt: initialisation, splicing, positions, pooling (readouts) and packing.

Nothing here imports Hugging Face, so every piece is testable on plain tensors.
Shapes: B batch, L text length (left padded), K soft tokens, H hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spt_embed.model.config import Init, Placement, Readout


def init_soft_prompt(
    embedding: torch.Tensor,
    num_tokens: int,
    init: Init | str,
    *,
    text_ids: list[int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Initial soft-token vectors (K, H) from the backbone's input embedding matrix (V, H).

    `text` tiles the given token ids and keeps the last K, so the last soft token (the pooled one) starts as the
    text's last token, as in PromptEOL where the embedding is read right after `in one word:"`.
    """
    init = Init(init)
    weight = embedding.detach().float()
    generator = torch.Generator().manual_seed(seed)
    if init is Init.RANDOM:
        std = weight.std().item()
        vectors = torch.randn(num_tokens, weight.shape[1], generator=generator) * std
    elif init is Init.VOCAB:
        ids = torch.randint(0, weight.shape[0], (num_tokens,), generator=generator)
        vectors = weight[ids]
    else:
        if not text_ids:
            raise ValueError("init='text' needs the init text to produce at least one token; it produced none.")
        repeats = -(-num_tokens // len(text_ids))  # ceil
        ids = torch.tensor((text_ids * repeats)[-num_tokens:])
        vectors = weight[ids]
    return vectors.clone().to(embedding.dtype)  # (K, H)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's real tokens moved to its right end, in their order, pads before them: the left-padded layout that
    everything here reads (the last position is the text's last token; the fast path packs `input_ids[b, -n:]`).

    preprocess() pads on the left, but a loss may join columns first: sentence-transformers' `embed_columns` merges a
    triplet's positive and negative columns and pads the narrower one *on the right* (zeros after the text). Read as
    left-padded, such a row would lose its text to the pads. Left-padded input comes back unchanged."""
    if attention_mask.shape[1] < 2 or _is_left_padded(attention_mask):
        return input_ids, attention_mask
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # pads (0) first, real tokens (1) in order
    return torch.gather(input_ids, 1, order), torch.gather(attention_mask, 1, order)


def _is_left_padded(attention_mask: torch.Tensor) -> bool:
    """Whether no row has a pad after a real token."""
    return bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all())


def left_pad_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so a left-padded row gets the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)


def splice(
    text_embeds: torch.Tensor, attention_mask: torch.Tensor, soft_prompt: torch.Tensor, placement: Placement | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Join left-padded text embeddings (B, L, H) and soft tokens (K, H) into one sequence (B, L+K, H).

    Suffix: [pads | text | soft]. Prefix: [soft | pads | text]; the pads in between are masked and the position
    ids from `left_pad_position_ids` stay contiguous, so both layouts pool at index -1.
    """
    batch = text_embeds.shape[0]
    soft = expand_soft_prompt(soft_prompt, batch, text_embeds.dtype)  # (B, K, H)
    soft_mask = attention_mask.new_ones(batch, soft_prompt.shape[0])  # (B, K)
    if Placement(placement) is Placement.SUFFIX:
        return torch.cat([text_embeds, soft], dim=1), torch.cat([attention_mask, soft_mask], dim=1)
    return torch.cat([soft, text_embeds], dim=1), torch.cat([soft_mask, attention_mask], dim=1)


def expand_soft_prompt(soft_prompt: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The same K soft tokens for every row: (K, H) -> (B, K, H), a view (gradients flow back to the one copy)."""
    return soft_prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)


def suffix_position_ids(text_attention_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions of K suffix tokens that follow a left-padded text: len(text) + arange(K). (B, K)"""
    lengths = text_attention_mask.long().sum(-1, keepdim=True)  # (B, 1)
    return lengths + torch.arange(num_tokens, device=text_attention_mask.device)


def last_token_pool(hidden_states: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last position (B, S, H) -> (B, H); with left padding that is a real token in every row."""
    return hidden_states[:, -1]


def soft_mean_pool(hidden_states: torch.Tensor, num_tokens: int, placement: Placement | str) -> torch.Tensor:
    """Mean of the K soft positions' states, (B, S, H) -> (B, H). They sit at the end of a spliced suffix sequence
    (and are the whole sequence of the fast path's soft pass) and at the start of a prefix one; no padding falls
    among them in either layout, so every row averages the same K positions."""
    if Placement(placement) is Placement.SUFFIX:
        return hidden_states[:, -num_tokens:].mean(dim=1)
    return hidden_states[:, :num_tokens].mean(dim=1)


def init_layer_weights(num_states: int) -> torch.Tensor:
    """Initial layer-mix weights (N+1,): one-hot on the final state, so the mix starts equal to the `last` readout.

    Un-normalised (no softmax): the embedding is L2-normalised afterwards, so their overall scale is free, and a
    weight of exactly 0 or 1 keeps the start exact."""
    weights = torch.zeros(num_states)
    weights[-1] = 1.0
    return weights


def layer_mix_pool(hidden_states: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum, in float32, of the last position's state in each of N+1 hidden-state tensors (each (B, S, H),
    S may differ from the full pass to the soft pass): (N+1,) weights -> (B, H).

    With a Hugging Face decoder's `hidden_states` these are the embedding output, the un-normalised residual stream
    after layers 1 .. N-1, and the final layer's output after the final norm (= `last_hidden_state`): the last
    entry sits on another scale than the others, which the trained weights absorb."""
    if len(hidden_states) != weights.shape[0]:
        raise ValueError(f"{weights.shape[0]} layer-mix weights for {len(hidden_states)} hidden states.")
    last = torch.stack([states[:, -1] for states in hidden_states]).float()  # (N+1, B, H)
    return torch.einsum("l,lbh->bh", weights.float(), last)


def pool(
    readout: Readout,
    last_hidden_state: torch.Tensor,
    hidden_states: Sequence[torch.Tensor] | None,
    *,
    num_tokens: int,
    placement: Placement | str,
    layer_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The embedding (B, H) that `readout` reads from a backbone's output: its final states (B, S, H) and, for
    layer-mix, all N+1 hidden-state tensors (the embedding output first)."""
    if readout is Readout.SOFT_MEAN:
        return soft_mean_pool(last_hidden_state, num_tokens, placement)
    if readout is Readout.LAYER_MIX:
        if hidden_states is None or layer_weights is None:
            raise ValueError("readout='layer-mix' needs the backbone's hidden states of every layer and its weights.")
        return layer_mix_pool(hidden_states, layer_weights)
    return last_token_pool(last_hidden_state)


def pack_texts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, row_tokens: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the real tokens of left-padded texts (B, L) into few rows without padding between them.

    Texts go longest first into the first row with room (first-fit decreasing); a row holds at most
    max(row_tokens, longest text) tokens. Position ids restart at 0 for every text, which is how transformers
    recognises packed sequences and keeps each one attending only to itself. The unused tail of a row is one more
    "text" of pad tokens that nothing reads.
    Returns packed ids (R, C), their position ids (R, C) and `index` (B, L): for each left-padded slot of the
    input, its flat position in the packed (R * C) layout (padding slots point at 0; they stay masked).
    """
    lengths = attention_mask.long().sum(-1).tolist()
    capacity = max(row_tokens, max(lengths, default=0), 1)
    width = input_ids.shape[1]
    rows: list[list[int]] = []  # text indices per packed row
    room: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        if lengths[b] == 0:
            continue
        slot = next((r for r, free in enumerate(room) if free >= lengths[b]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(b)
        room[slot] -= lengths[b]
    capacity -= min(room, default=0)  # no row needs more than the fullest one
    packed = torch.full((max(len(rows), 1), capacity), pad_id, dtype=input_ids.dtype)
    positions = torch.zeros_like(packed)
    index = torch.zeros_like(input_ids, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for b in members:
            n = lengths[b]
            packed[r, start : start + n] = input_ids[b, width - n :]
            positions[r, start : start + n] = torch.arange(n)
            index[b, width - n :] = r * capacity + start + torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(capacity - start)  # the pad tail: its own sequence
    return packed.to(input_ids.device), positions.to(input_ids.device), index.to(input_ids.device)


def unpack_states(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Packed per-token states (R, h, C, d) -> left-padded per-text states (B, h, L, d) by `pack_texts`' index."""
    rows, heads, capacity, dim = states.shape
    flat = states.permute(0, 2, 1, 3).reshape(rows * capacity, heads, dim)  # (R*C, h, d)
    return flat[index].permute(0, 2, 1, 3)  # (B, h, L, d)
