"""The import path that adapters saved by spt-embed 0.1 name in their modules.json
(`spt_embed.module.SuffixPromptModule`); the class lives in `spt_embed.model.module`."""

from spt_embed.model.module import SuffixPromptModule

__all__ = ["SuffixPromptModule"]
