"""InfoNCE that embeds all of a batch's columns in one forward pass when the suffix's fast path runs them.

sentence-transformers' MultipleNegativesRankingLoss embeds the anchor column on its own and merges only the candidate
columns (positive, negatives): merging pads every row to the widest column, which is waste for a padded forward when
short queries meet long documents. The fast path has no such waste: its text pass packs the real tokens of all
texts into rows without padding, and its soft pass runs the K soft tokens of every text at once. What merging the
anchor in buys there is bigger matrix products: on 32 SNLI pairs (train/profile_step.py, 2 cores) the MLP's gate
and up products over the soft pass's 512 rows (32 texts x 16 soft tokens) cost a third more per row than over 900
or more, its other products 10-20 % more. Measured with train/bench_step.py (`fast` against `fast-columns`), the
merged step is 7-9 % faster and its step memory 14-17 % higher, so it is left out where `recompute_mlp` asks for
memory first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import Tensor


def merges_all_columns(model, features: list[dict[str, Any]]) -> bool:
    """Whether one forward over all columns is what `model` runs best: its first module takes the suffix's fast
    path for this batch (a causal backbone, suffix placement, a trained soft prompt) and every column goes through
    the same soft prompt (a query column and document columns, say, do not). Not with `recompute_mlp`, which asks
    for memory before time: the merged step's peak is about 15 % higher (train/results/bench_step_merged*.json)."""
    from spt_embed.model.module import SuffixPromptModule

    model = getattr(model, "module", model)  # the SentenceTransformer inside DistributedDataParallel
    try:
        module = model[0]
    except (TypeError, IndexError, KeyError):  # not a model of modules
        return False
    if not isinstance(module, SuffixPromptModule) or module.recompute_mlp:
        return False
    if len({f.get("task") for f in features}) != 1:
        return False
    from spt_embed.model.fast_path import ForwardPath

    return module.resolve_path(1, module.soft_prompt_for(features[0].get("task"))) is ForwardPath.FAST


class MergedColumnsMNRL(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss whose anchors share the candidates' forward pass on the fast path (the same loss
    and gradients: `tests/test_merged_columns.py`); any other model or batch takes the parent's forward."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        embeddings = embed_columns(self.model, features, separate_first=not merges_all_columns(self.model, features))
        return self.compute_loss_from_embeddings(embeddings, labels)
