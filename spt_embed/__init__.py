"""spt-embed: turn a frozen decoder LLM into a text encoder by suffix prompt tuning."""

__version__ = "0.1.0"

from spt_embed.backbone import load_backbone  # noqa: E402
from spt_embed.config import BackboneRef, Init, Placement, SuffixPromptConfig  # noqa: E402
from spt_embed.encoder import SuffixPromptEncoder, load, save  # noqa: E402
from spt_embed.export import export  # noqa: E402
from spt_embed.index import Index, build_index, load_index  # noqa: E402
from spt_embed.indexing import index_corpus, merge_shards  # noqa: E402
from spt_embed.mntp import mntp  # noqa: E402
from spt_embed.mntp_config import MNTPConfig  # noqa: E402
from spt_embed.module import ForwardPath, SuffixPromptModule  # noqa: E402
from spt_embed.train_config import TrainConfig  # noqa: E402
from spt_embed.training import train  # noqa: E402

__all__ = [
    "BackboneRef",
    "ForwardPath",
    "Index",
    "Init",
    "MNTPConfig",
    "Placement",
    "SuffixPromptConfig",
    "SuffixPromptEncoder",
    "SuffixPromptModule",
    "TrainConfig",
    "__version__",
    "build_index",
    "export",
    "index_corpus",
    "load",
    "load_backbone",
    "load_index",
    "merge_shards",
    "mntp",
    "save",
    "train",
]
