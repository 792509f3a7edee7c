"""spt-embed: turn a frozen decoder LLM into a text encoder by suffix prompt tuning.

The public names below are imported on first use (PEP 562), so `import spt_embed` and `spt-embed --help` stay
fast: torch, transformers, mteb and faiss load only when a name that needs them is touched.

Layout, one folder per stage of the pipeline:
    model/       the soft prompt, the sentence-transformers module, backbones, baselines, export
    training/    suffix-prompt training (and its LoRA baseline), data, the bidirectional MNTP stage
    evaluation/  mteb on local tasks
    retrieval/   corpora, FAISS indexes, sharded indexing, distributed encoding on Ray
    cli/         the `spt-embed` command line
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spt_embed._version import __version__

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "load_backbone": "spt_embed.model.backbone",
    "BackboneRef": "spt_embed.model.config",
    "Init": "spt_embed.model.config",
    "Placement": "spt_embed.model.config",
    "Readout": "spt_embed.model.config",
    "SuffixPromptConfig": "spt_embed.model.config",
    "SuffixPromptEncoder": "spt_embed.model.encoder",
    "load": "spt_embed.model.encoder",
    "save": "spt_embed.model.encoder",
    "export": "spt_embed.model.export",
    "ForwardPath": "spt_embed.model.module",
    "SuffixPromptModule": "spt_embed.model.module",
    "Index": "spt_embed.retrieval.index",
    "build_index": "spt_embed.retrieval.index",
    "load_index": "spt_embed.retrieval.index",
    "index_corpus": "spt_embed.retrieval.indexing",
    "merge_shards": "spt_embed.retrieval.indexing",
    "index_from_parquet": "spt_embed.retrieval.parquet_shards",
    "encode_corpus_ray": "spt_embed.retrieval.ray_encoding",
    "mntp": "spt_embed.training.mntp",
    "MNTPConfig": "spt_embed.training.mntp_config",
    "TrainConfig": "spt_embed.training.train_config",
    "train": "spt_embed.training.train",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spt_embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from spt_embed.model.backbone import load_backbone
    from spt_embed.model.config import BackboneRef, Init, Placement, Readout, SuffixPromptConfig
    from spt_embed.model.encoder import SuffixPromptEncoder, load, save
    from spt_embed.model.export import export
    from spt_embed.model.module import ForwardPath, SuffixPromptModule
    from spt_embed.retrieval.index import Index, build_index, load_index
    from spt_embed.retrieval.indexing import index_corpus, merge_shards
    from spt_embed.retrieval.parquet_shards import index_from_parquet
    from spt_embed.retrieval.ray_encoding import encode_corpus_ray
    from spt_embed.training.mntp import mntp
    from spt_embed.training.mntp_config import MNTPConfig
    from spt_embed.training.train import train
    from spt_embed.training.train_config import TrainConfig
