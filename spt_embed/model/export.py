"""Export an adapter to a plain SentenceTransformer folder that loads with no custom code.

The K soft tokens become K added special tokens whose input-embedding rows hold the trained vectors; the
tokenizer's post-processor appends them to every text (after truncation, which leaves room for them); pooling is
sentence-transformers' own last-token pooling.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers.processors import TemplateProcessing

from spt_embed.atomic import atomic_folder
from spt_embed.model.config import Placement
from spt_embed.model.encoder import load
from spt_embed.model.module import SuffixPromptModule
from spt_embed.model.specs import MODULES_NAME

logger = logging.getLogger(__name__)


def soft_token_names(num_tokens: int, vocab: dict[str, int]) -> list[str]:
    """Names for the added tokens that collide with nothing in the vocabulary."""
    stem = "<|spt_{}|>"
    while any(stem.format(i) in vocab for i in range(num_tokens)):
        stem = "<|" + stem[2:-2] + "_|>"
    return [stem.format(i) for i in range(num_tokens)]


def _special_tokens_around_text(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text (e.g. BOS), found by tokenising with and without them."""
    probe = "spt probe text"
    with_special = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start], with_special[start + len(bare) :]
    raise ValueError("Cannot locate the text inside the tokenizer's special-token template; export unsupported.")


def export(
    adapter: str | os.PathLike | SentenceTransformer, output: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a self-contained plain SentenceTransformer folder equivalent to the adapter; returns its path."""
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it.")
    model = adapter if isinstance(adapter, SentenceTransformer) else load(adapter)
    module = model[0]
    if not isinstance(module, SuffixPromptModule):
        raise TypeError(f"Expected a suffix-prompt encoder, got first module {type(module).__name__}.")
    if module.spt_config.placement is not Placement.SUFFIX:
        raise ValueError("Only suffix placement can be exported as a plain SentenceTransformer (prefix cannot pool last).")

    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder is free to take; atomic_folder replaces only a folder of its own kind
    atomic_folder(out, lambda folder: _write_plain(model, folder), overwrite=overwrite, marker=MODULES_NAME)
    logger.info("Exported %s to %s (plain SentenceTransformer, %d soft tokens)", adapter, out, module.num_tokens)
    return out


def _write_plain(model: SentenceTransformer, folder: Path) -> None:
    """Fill `folder` with the plain SentenceTransformer. It is built from a reloaded copy of the backbone, so the
    encoder in memory stays untouched."""
    from transformers import AutoModel, AutoTokenizer

    from spt_embed.model.backbone import ensure_pad_token

    module = model[0]
    backbone_dir = folder / "_backbone"
    module.backbone.save_pretrained(backbone_dir)
    module.tokenizer.save_pretrained(backbone_dir)
    backbone = AutoModel.from_pretrained(backbone_dir, dtype=next(module.backbone.parameters()).dtype)
    tok = AutoTokenizer.from_pretrained(backbone_dir)
    ensure_pad_token(tok, backbone_dir)
    before, after = _special_tokens_around_text(tok)
    names = soft_token_names(module.num_tokens, tok.get_vocab())
    tok.add_tokens(names, special_tokens=True)
    ids = tok.convert_tokens_to_ids(names)
    backbone.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        backbone.get_input_embeddings().weight[ids] = module.soft_prompt.detach().to(backbone.dtype)
    template = [tok.convert_ids_to_tokens(i) for i in before] + ["$A"]
    template += [tok.convert_ids_to_tokens(i) for i in after] + names
    specials = {tok.convert_ids_to_tokens(i): i for i in [*before, *after, *ids]}
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=" ".join(template), special_tokens=list(specials.items())
    )
    # Without this, sentence-transformers wraps every input in the chat template.
    tok.chat_template = None
    tok.model_max_length = module.max_seq_length
    backbone.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.rmtree(backbone_dir)

    transformer = Transformer(str(folder), max_seq_length=module.max_seq_length)
    pooling = Pooling(module.get_embedding_dimension(), pooling_mode="lasttoken")
    modules = [transformer, pooling] + [m for m in list(model)[1:] if isinstance(m, Normalize)]
    plain = SentenceTransformer(modules=modules, device="cpu", prompts=model.prompts or None)
    plain.save(str(folder))
