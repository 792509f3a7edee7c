"""Export an adapter to a plain SentenceTransformer folder that loads with no custom code.

The K soft tokens become K added special tokens whose input-embedding rows hold the trained vectors; the
tokenizer's post-processor appends them to every text (after truncation, which leaves room for them); pooling is
sentence-transformers' own last-token pooling. That covers the `last` readout only: the `soft-mean` and `layer-mix`
readouts need the adapter's own module (`spt_embed.load`). An encoder's text template (its default prompt) goes
into the export's sentence-transformers prompts.

Every export holds `spt_export.json` (the spt-embed version, the adapter exported, the soft tokens' names): the
mark by which `overwrite=True` recognises a folder it may replace. Any other non-empty folder, and any output that
is, contains or lies inside the adapter's own folder, is refused before anything is written.
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

from spt_embed._version import __version__
from spt_embed.atomic import atomic_folder, write_json
from spt_embed.model.config import AdapterMethod, Placement, Readout
from spt_embed.model.encoder import is_baseline_folder, load, resolve_adapter_path
from spt_embed.model.module import SuffixPromptModule

logger = logging.getLogger(__name__)

EXPORT_MARKER = "spt_export.json"


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
    """Write a self-contained plain SentenceTransformer folder equivalent to the adapter; returns its path.

    `output` must be new, empty, or (with `overwrite`) an earlier export; never the adapter's folder, inside it, or
    around it."""
    out = Path(output).expanduser()
    if isinstance(adapter, SentenceTransformer):
        source = None
    elif is_baseline_folder(adapter):  # method=prefix or lora: refused below, with the reason
        source = Path(adapter).expanduser().resolve()
    else:
        source = resolve_adapter_path(adapter).resolve()
    _check_output(source, out, overwrite=overwrite)
    model = adapter if isinstance(adapter, SentenceTransformer) else load(adapter)
    module = model[0]
    kind = getattr(module, "peft_kind", None)
    if kind == "prefix":
        raise ValueError(
            "Method 'prefix' cannot be exported as a plain SentenceTransformer: its trained keys/values at every "
            "layer have no place in a plain decoder. Use the folder itself: spt_embed.load(...) (or "
            "SentenceTransformer(folder, trust_remote_code=True)) gives the same encoder (nothing was written)."
        )
    if not isinstance(module, SuffixPromptModule):
        raise TypeError(
            f"Expected a suffix-prompt encoder, got first module {type(module).__name__}: export writes a suffix "
            f"adapter's soft tokens into a plain SentenceTransformer. Load this folder with spt_embed.load(...)."
        )
    if module.spt_config.method is not AdapterMethod.SUFFIX:
        raise ValueError(
            f"Method {module.spt_config.method.value!r} cannot be exported as a plain SentenceTransformer: its "
            f"per-layer offsets at the soft positions have no place in a plain decoder (export writes the soft "
            f"tokens as vocabulary rows, nothing else). Use the adapter itself: spt_embed.load(...) (or "
            f"SentenceTransformer(adapter, trust_remote_code=True)) gives the same encoder (nothing was written)."
        )
    if module.task_names:
        raise ValueError(
            f"An adapter with task soft prompts ({', '.join(module.task_names)}, beside the default one) cannot be "
            f"exported as a plain SentenceTransformer: export writes one set of soft tokens as vocabulary rows "
            f"after every text, and sentence-transformers' prompts and Router can only put text before it or route "
            f"to whole copies of the backbone. Use the adapter itself: spt_embed.load(...) (or "
            f"SentenceTransformer(adapter, trust_remote_code=True)) routes encode_query / encode_document to their "
            f"prompts (nothing was written)."
        )
    if module.spt_config.task_max_length:
        logger.warning(
            "The export has one maximum length (%d tokens) for every text; the adapter's per-task lengths %s are "
            "not kept.", module.max_seq_length, module.spt_config.task_max_length
        )
    if module.spt_config.placement is not Placement.SUFFIX:
        raise ValueError("Only suffix placement can be exported as a plain SentenceTransformer (prefix cannot pool last).")
    if module.readout is not Readout.LAST:
        raise ValueError(
            f"Readout {module.readout.value!r} cannot be exported as a plain SentenceTransformer: its pooling "
            f"(last-token pooling of the final layer) reads only the 'last' readout. Use the adapter itself: "
            f"spt_embed.load(...) (or SentenceTransformer(adapter, trust_remote_code=True)) gives the same encoder "
            f"(nothing was written)."
        )

    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder is free to take; atomic_folder replaces only a folder of its own kind
    atomic_folder(out, lambda folder: _write_plain(model, folder, source), overwrite=overwrite, marker=EXPORT_MARKER)
    logger.info("Exported %s to %s (plain SentenceTransformer, %d soft tokens)", adapter, out, module.num_tokens)
    return out


def _check_output(source: Path | None, out: Path, *, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an output that would replace the adapter folder `source` (the
    same folder, resolved through symlinks, one inside it, or one around it) or a folder that is not an earlier
    export."""
    if source is not None:
        target = out.resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else "is inside" if source in target.parents else "contains"
            raise ValueError(
                f"The output folder {out} {relation} the adapter folder {source}: exporting there would replace the "
                f"adapter. Choose an output folder outside it (nothing was written)."
            )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass a new or empty folder as the export's output.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace an earlier export."
            )
        if not (out / EXPORT_MARKER).is_file():
            raise FileExistsError(
                f"{out} is not an earlier export (it has no {EXPORT_MARKER}, which every export writes), and "
                f"--overwrite replaces only those. Choose a new or empty folder (nothing was changed)."
            )


def _write_plain(model: SentenceTransformer, folder: Path, source: Path | None) -> None:
    """Fill `folder` with the plain SentenceTransformer and its `spt_export.json` (`source`: the adapter's folder,
    None for a model passed in memory). It is built from a reloaded copy of the backbone, so the encoder in memory
    stays untouched."""
    from transformers import AutoModel, AutoTokenizer

    from spt_embed.model.backbone import ensure_pad_token

    module = model[0]
    backbone_dir = folder / "_backbone"
    module.backbone.save_pretrained(backbone_dir)
    module.tokenizer.save_pretrained(backbone_dir)
    backbone = AutoModel.from_pretrained(
        backbone_dir, dtype=next(module.backbone.parameters()).dtype, trust_remote_code=False, use_safetensors=True
    )
    tok = AutoTokenizer.from_pretrained(backbone_dir, trust_remote_code=False)
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
    plain = SentenceTransformer(
        modules=modules, device="cpu", prompts=model.prompts or None, default_prompt_name=model.default_prompt_name
    )
    plain.save(str(folder))
    record = {"spt_embed_version": __version__, "adapter": str(source) if source else None, "soft_tokens": names}
    write_json(folder / EXPORT_MARKER, record)
