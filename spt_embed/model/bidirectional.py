"""Switch a decoder's causal attention off (LLM2Vec-style), keeping the padding mask.

transformers 5 builds every supported decoder's attention mask from its config: with ``config.is_causal = False``
``create_causal_mask`` returns a bidirectional padding mask, and the base model's forward hands ``is_causal=False``
to the attention kernel. Setting the flag on the config (not on a forward call) means ``save_pretrained`` writes it
to config.json, so a saved backbone reloads bidirectionally with no extra step. No attention class is copied or
patched; an architecture is supported once a test shows it honours the flag.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# config.model_type values whose attention is known (tests/test_bidirectional.py) to honour config.is_causal.
SUPPORTED = {"llama", "qwen2", "mistral"}


def is_bidirectional(config) -> bool:
    """True when a config asks for bidirectional attention (an absent flag means causal)."""
    return getattr(config, "is_causal", True) is False


def check_supported(config) -> None:
    """Raise a ValueError naming the fix when `config`'s architecture is not in SUPPORTED."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"Bidirectional attention is not supported for model_type {model_type!r}; supported: "
            f"{', '.join(sorted(SUPPORTED))}. To add an architecture, check that its attention honours "
            f"config.is_causal (add it to the parametrised tests in tests/test_bidirectional.py: a later token must "
            f"change an earlier position's hidden state and pad tokens must change nothing), then add its "
            f"model_type to spt_embed.model.bidirectional.SUPPORTED."
        )


def make_bidirectional(model: torch.nn.Module, *, verify: bool = True) -> torch.nn.Module:
    """Turn causal attention off in a loaded decoder (base model, causal LM or peft wrapper); idempotent.

    With `verify`, a three-token probe checks that a later token now changes position 0, so a transformers
    release that stopped honouring the flag fails here instead of silently training a causal model.
    """
    config = model.config
    check_supported(config)
    config.is_causal = False
    if verify:
        verify_bidirectional(model)
    return model


def verify_bidirectional(model: torch.nn.Module) -> None:
    """Raise a ValueError unless the last of three tokens changes the output at position 0."""
    parameter = next(model.parameters())
    vocab = model.config.vocab_size
    first = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=parameter.device)
    second = first.clone()
    second[0, -1] = 4 % vocab
    was_training = model.training
    model.eval()  # dropout would make the two outputs differ anyway
    try:
        with torch.no_grad():
            outputs = [_first_output(model(input_ids=ids, use_cache=False)) for ids in (first, second)]
    finally:
        model.train(was_training)
    if torch.equal(outputs[0][0, 0], outputs[1][0, 0]):
        raise ValueError(
            f"config.is_causal=False had no effect on this {model.config.model_type!r} model: its first position still "
            f"ignores later tokens. This transformers version does not honour the flag for this architecture; "
            f"remove {model.config.model_type!r} from spt_embed.model.bidirectional.SUPPORTED or use another "
            f"transformers version."
        )


def _first_output(output) -> torch.Tensor:
    # A base model returns hidden states, a causal LM logits: either shows whether position 0 saw later tokens.
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output.logits
