"""Masked next-token prediction (MNTP) data: choose, corrupt and label tokens; the loss. Pure torch.

20 % of a text's tokens are chosen as targets; of those 80 % show the mask token, 10 % a random token and 10 %
themselves (BERT's recipe). The chosen token at position i is predicted from the output at position i−1 (LLM2Vec),
so a causal LM's head keeps its meaning. That shift is done once, here, in `shifted_labels`; `mntp_loss` adds none.

Mask token: the tokenizer's own if it has one, else ``_`` (LLM2Vec's choice for Llama and Mistral, which have
none): an ordinary vocabulary token, so no embedding row has to be added. Any other single vocabulary token can be
named; one the vocabulary lacks is an error, never silently added.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions that carry no MNTP target
DEFAULT_MASK_TOKEN = "_"


def resolve_mask_token_id(tokenizer, mask_token: str | None = None) -> int:
    """The id shown at masked positions: `mask_token`, else the tokenizer's mask token, else '_'."""
    if mask_token is None:
        if tokenizer.mask_token is not None:
            return tokenizer.mask_token_id
        mask_token = DEFAULT_MASK_TOKEN
    token_id = tokenizer.get_vocab().get(mask_token)
    if token_id is None:
        # The text may still map to one token under the tokenizer's own pre-tokenisation (e.g. byte-level BPE).
        ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
        token_id = ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None
    if token_id is None:
        raise ValueError(
            f"Mask token {mask_token!r} is not a single token of this tokenizer's vocabulary, and the tokenizer "
            f"defines no mask token of its own. Pass --mask-token with a token it has (its unk, pad or eos token, "
            f"e.g. {tokenizer.unk_token or tokenizer.eos_token!r}, or a rarely used one)."
        )
    return token_id


def tokenize_corpus(tokenizer, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """Token ids (truncated to max_length) and the special-token flags of every text; empty results dropped."""
    if not texts:  # a fast tokenizer called on an empty batch fails with an IndexError (e.g. --eval-lines 0)
        return []
    encoded = tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True)
    rows, truncated = [], 0
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        if len(ids) > max_length:
            truncated += 1
            ids, special = ids[:max_length], special[:max_length]
        if ids:
            rows.append({"input_ids": ids, "special_tokens_mask": special})
    if truncated:
        logger.info(
            "%d of %d texts are longer than max_length=%d tokens: truncated.", truncated, len(texts), max_length
        )
    return rows


def choose_targets(candidates: torch.Tensor, mask_prob: float, generator: torch.Generator | None = None):
    """Each candidate position is chosen with probability mask_prob; (B, L) bool."""
    draw = torch.rand(candidates.shape, generator=generator)
    return candidates & (draw < mask_prob)


def corrupt(
    input_ids: torch.Tensor,
    chosen: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BERT's 80/10/10: chosen positions show the mask token (80 %), a random token (10 %) or themselves (10 %)."""
    draw = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    corrupted = input_ids.clone()
    corrupted[chosen & (draw < 0.8)] = mask_token_id
    randomise = chosen & (draw >= 0.8) & (draw < 0.9)
    corrupted[randomise] = random_ids[randomise]
    return corrupted


def shifted_labels(input_ids: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """MNTP targets already moved one step left: labels[:, i-1] = input_ids[:, i] where position i was chosen.

    The output at position i−1 predicts the chosen token at i (LLM2Vec), which keeps the causal LM head's meaning
    (next token) while the model now also sees the context to the right. The loss then scores logits[:, j]
    against labels[:, j] with no further shift.
    """
    labels = torch.full_like(input_ids, IGNORE)  # (B, L)
    labels[:, :-1] = torch.where(chosen[:, 1:], input_ids[:, 1:], IGNORE)
    return labels


@dataclass
class MNTPCollator:
    """Right-pads tokenised texts and masks them for MNTP: input_ids (corrupted), attention_mask, labels (shifted).

    Without an explicit `generator`, a batch's masks are drawn from a generator seeded by `seed` and the batch's
    token ids: the same batch always gets the same masks, so a resumed run masks exactly like an uninterrupted one
    (torch's global RNG would not do: the data loader collates one batch ahead of the step being checkpointed).
    A text gets new masks each epoch because shuffling puts it into a different batch.
    """

    pad_token_id: int
    mask_token_id: int
    vocab_size: int
    mask_prob: float = 0.2
    seed: int = 0
    generator: torch.Generator | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros_like(input_ids)
        special = torch.ones_like(input_ids, dtype=torch.bool)  # padding counts as special: never a target
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            special[row, :n] = torch.tensor(feature["special_tokens_mask"], dtype=torch.bool)
        candidates = ~special
        # Right padding puts every text's first token in column 0; no position i−1 exists to predict it from.
        candidates[:, 0] = False
        generator = self.generator or _batch_generator(self.seed, input_ids)
        chosen = choose_targets(candidates, self.mask_prob, generator)
        return {
            "input_ids": corrupt(input_ids, chosen, self.mask_token_id, self.vocab_size, generator),
            "attention_mask": attention_mask,
            "labels": shifted_labels(input_ids, chosen),
        }


def _batch_generator(seed: int, input_ids: torch.Tensor) -> torch.Generator:
    digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, L, V) against labels (B, L) that shifted_labels already aligned: no shift here.

    Also takes logits (N, V) already gathered at the N target positions with their labels (N,), as training
    computes them (see spt_embed.training.mntp.target_logits).
    """
    keep = labels != IGNORE  # (B, L) or (N,)
    if not keep.any():  # a batch of one-token texts: nothing to predict
        return logits.sum() * 0.0
    if keep.all():  # every position is a target: a view, not a copy of the (N, V) logits
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    else:
        logits, labels = logits[keep], labels[keep]
    return F.cross_entropy(logits.float(), labels, reduction=reduction)
