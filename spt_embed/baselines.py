"""The import path that LoRA baseline folders saved by spt-embed 0.1 name in their modules.json
(`spt_embed.baselines.BaselineModule`); the class lives in `spt_embed.model.baselines`."""

from spt_embed.model.baselines import BaselineModule

__all__ = ["BaselineModule"]
