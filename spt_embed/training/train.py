"""`spt-embed train`: suffix prompt tuning on sentence-transformers' trainer with in-batch InfoNCE.

Our code only builds the encoder (frozen backbone + soft tokens; the module picks the causal fast path by itself),
the data and the loss; the loop, schedule, checkpoints and multi-process training are the trainer's. With
``method=lora`` the same machinery trains the LoRA baseline instead: the PromptEOL encoder of the same backbone
with LoRA on its projections, merged and saved as a SentenceTransformer folder at the end.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt_embed.recipe import is_main_process, resume_checkpoint, world_size
from spt_embed.training.run_log import JsonlLogCallback, plot_log
from spt_embed.training.train_config import TRAIN_CONFIG_NAME, Method, TrainConfig

if TYPE_CHECKING:
    from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "training.png"


def checkpoint_weights(method: Method) -> str:
    """The trained weights' file inside a checkpoint, relative to it."""
    from spt_embed.model.baselines import LORA_WEIGHTS
    from spt_embed.model.config import WEIGHTS_NAME

    return LORA_WEIGHTS if method is Method.LORA else WEIGHTS_NAME


def build_loss(model, config: TrainConfig):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    directions = ("query_to_doc", "doc_to_query") if config.symmetric else ("query_to_doc",)
    common: dict[str, Any] = {
        "scale": 1.0 / config.temperature,
        "gather_across_devices": world_size() > 1,
        "directions": directions,
    }
    if config.cached:
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size, **common)
    return MultipleNegativesRankingLoss(model, **common)


def build_dev_evaluator(config: TrainConfig):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from spt_embed.datafiles import load_sts

    s1, s2, scores = load_sts("dev")
    if config.eval_pairs and config.eval_pairs < len(s1):
        # A seeded random sample: the file is sorted by genre, so its head is all easy captions.
        keep = sorted(random.Random(config.seed).sample(range(len(s1)), config.eval_pairs))
        s1, s2, scores = [s1[i] for i in keep], [s2[i] for i in keep], [scores[i] for i in keep]
    return EmbeddingSimilarityEvaluator(s1, s2, scores, name="stsb-dev", batch_size=64, write_csv=False)


DEV_METRIC = "eval_stsb-dev_spearman_cosine"


def load_datasets(config: TrainConfig):
    """One dataset per source; several sources stay apart so every batch comes from one source (in-batch negatives
    stay within a source and triplet sources keep their hard negatives), sampled in proportion to size."""
    from spt_embed.training.data import load_pairs

    datasets = {}
    for source in config.data:
        name = Path(source).stem if Path(source).suffix else Path(source).name
        name = "".join(c if c.isalnum() else "_" for c in name)
        while name in datasets:
            name += "_"
        datasets[name] = load_pairs(
            source,
            anchor=config.anchor_column,
            positive=config.positive_column,
            negative=config.negative_column,
            limit=config.max_samples,
        )
        rows = len(datasets[name])
        if rows < config.batch_size:
            raise ValueError(
                f"Training source {source} has {rows} usable rows, fewer than one batch ({config.batch_size}); "
                f"add data or lower --batch-size."
            )
        logger.info("Training source %s: %d rows, columns %s", source, rows, datasets[name].column_names)
    return next(iter(datasets.values())) if len(datasets) == 1 else datasets


def build_model(config: TrainConfig):
    """The encoder to train: soft tokens on the frozen backbone (spt), or PromptEOL with LoRA on it (lora)."""
    device = "cpu" if not _cuda() else None
    if config.method is Method.LORA:
        from spt_embed.model.baselines import lora_baseline_encoder

        return lora_baseline_encoder(
            config.backbone,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            targets=config.lora_targets,
            max_length=config.max_length,
            seed=config.seed,
            device=device,
        )
    from spt_embed.model.encoder import SuffixPromptEncoder

    return SuffixPromptEncoder.from_backbone(
        config.backbone,
        num_tokens=config.num_tokens,
        init=config.init,
        init_text=config.init_text,
        placement=config.placement,
        max_length=config.max_length,
        seed=config.seed,
        device=device,
    )


def _check_resume_method(output: Path, config: TrainConfig) -> None:
    """Checkpoints of one method cannot continue as the other."""
    path = output / TRAIN_CONFIG_NAME
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8")).get("method", Method.SPT.value)
    if saved != config.method.value:
        raise ValueError(
            f"{output} holds a --method {saved} run; this run is --method {config.method.value}. Resume with "
            f"--method {saved}, or choose another --output (nothing was changed)."
        )


def train(
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    **options: Any,
):
    """Train a suffix prompt (or the LoRA baseline with method='lora'); returns the trained SentenceTransformer
    (best dev checkpoint when evaluating; for lora with LoRA merged), also saved to `output`.

    `spt_embed.train(output="out/enc", data=["snli-triplets"], max_steps=300)` takes the same options as the CLI.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    config = config or TrainConfig(**options)
    if not config.output:
        raise ValueError("No output folder: pass output='out/my-encoder' (CLI: --output).")
    output = Path(config.output)
    if resume:
        _check_resume_method(output, config)
    checkpoint = resume_checkpoint(output, checkpoint_weights(config.method), resume=resume)
    output.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        config.save(output)
        if not resume:
            (output / LOG_NAME).unlink(missing_ok=True)

    dataset = load_datasets(config)
    model = build_model(config)
    evaluating = config.eval_steps > 0
    cuda = _cuda()
    args = SentenceTransformerTrainingArguments(
        **config.trainer_arguments(output),
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_steps or None,
        load_best_model_at_end=evaluating,
        metric_for_best_model=DEV_METRIC if evaluating else None,
        greater_is_better=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        dataloader_drop_last=True,
        use_cpu=not cuda,
        ddp_backend=None if cuda else ("gloo" if world_size() > 1 else None),
        ddp_find_unused_parameters=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=build_loss(model, config),
        evaluator=build_dev_evaluator(config) if evaluating else None,
        callbacks=[JsonlLogCallback(output / LOG_NAME), *(callbacks or [])],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if config.method is Method.LORA:
        model[0].merge_lora()  # a plain decoder again: the saved folder needs no peft
    if is_main_process():
        model.save(str(output))
        if (output / LOG_NAME).is_file():
            plot_log(output / LOG_NAME, output / PLOT_NAME, DEV_METRIC)
        best = trainer.state.best_metric
        logger.info(
            "Saved the %s to %s%s",
            "LoRA baseline (merged)" if config.method is Method.LORA else "adapter",
            output,
            f" (best STS-B dev Spearman {best:.4f})" if best is not None else "",
        )
    return model


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
