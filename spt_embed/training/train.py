"""`spt-embed train`: suffix prompt tuning on sentence-transformers' trainer with in-batch InfoNCE.

Our code only builds the encoder (frozen backbone + soft tokens; the module picks the causal fast path by itself),
the data and the loss; the loop, schedule, checkpoints and multi-process training are the trainer's. With
``method=lora`` the same machinery trains the LoRA baseline instead: the PromptEOL encoder of the same backbone
with LoRA on its projections, merged and saved as a SentenceTransformer folder at the end.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from spt_embed.training.train_config import TRAIN_CONFIG_NAME, Method, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOG_NAME = "train_log.jsonl"
PLOT_NAME = "training.png"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_weights(method: Method) -> str:
    """The trained weights' file inside a checkpoint, relative to it."""
    from spt_embed.model.baselines import LORA_WEIGHTS
    from spt_embed.model.config import WEIGHTS_NAME

    return LORA_WEIGHTS if method is Method.LORA else WEIGHTS_NAME


def latest_checkpoint(output: Path, method: Method = Method.SPT) -> Path | None:
    """The newest checkpoint whose files are all complete; a half-written one (killed mid-save) is skipped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = output / CHECKPOINTS
    candidates = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    for candidate in candidates:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            load_file(str(candidate / checkpoint_weights(method)))
            if not (candidate / "optimizer.pt").is_file() or not (candidate / "scheduler.pt").is_file():
                raise FileNotFoundError("optimizer or scheduler state missing")
        except (OSError, ValueError, SafetensorError) as exc:
            logger.warning("Skipping incomplete checkpoint %s (%s)", candidate, exc)
            continue
        return candidate
    return None


class JsonlLogCallback(TrainerCallback):
    """Appends every trainer log (loss, lr, dev score) as one JSON line; survives kills and resumes."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def plot_log(log_path: Path, out_path: Path, metric: str) -> None:
    """Training loss and dev Spearman against steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    loss = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    dev = sorted({r["step"]: r[metric] for r in records if metric in r}.items())
    fig, ax_loss = plt.subplots(figsize=(7, 4))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue", label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("InfoNCE loss", color="tab:blue")
    if dev:
        ax_dev = ax_loss.twinx()
        ax_dev.plot(*zip(*dev), "o-", color="tab:orange", label="STS-B dev Spearman")
        ax_dev.set_ylabel("STS-B dev Spearman (cosine)", color="tab:orange")
    ax_loss.set_title("spt-embed training")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


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

    from spt_embed.training.data import load_sts

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
    checkpoint = latest_checkpoint(output, config.method) if resume else None
    if resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch.", output / CHECKPOINTS)
    if not resume and (output / CHECKPOINTS).is_dir() and any((output / CHECKPOINTS).iterdir()):
        raise FileExistsError(
            f"{output / CHECKPOINTS} already holds checkpoints; pass --resume to continue that run, or choose "
            f"another --output (nothing was overwritten)."
        )
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
        output_dir=str(output / CHECKPOINTS),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.scheduler.value,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_steps or None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=evaluating,
        metric_for_best_model=DEV_METRIC if evaluating else None,
        greater_is_better=True,
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        dataloader_drop_last=True,
        report_to="none",
        use_cpu=not cuda,
        ddp_backend=None if cuda else ("gloo" if world_size() > 1 else None),
        ddp_find_unused_parameters=False,
        disable_tqdm=not is_main_process(),
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
