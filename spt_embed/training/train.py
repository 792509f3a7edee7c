"""`spt-embed train`: suffix prompt tuning on sentence-transformers' trainer with in-batch InfoNCE.

Our code only builds the encoder (frozen backbone + soft tokens; the module picks the causal fast path by itself),
the data and the loss; the loop, schedule, checkpoints and multi-process training are the trainer's. With
``method=lora`` the same machinery trains the LoRA baseline instead: the PromptEOL encoder of the same backbone
with LoRA on its projections, saved at the end as its peft adapter on the named backbone (lora/, as prefix tuning
saves prefix/; `spt-embed merge-lora` writes a merged copy).

A run writes nothing before its inputs are checked (options, data, backbone, the folder, a resume's settings),
writes only into a new or empty folder or one of its own earlier runs (see `spt_embed.recipe.prepare_run_folder`),
and saves no adapter when it trained for no step.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt_embed.atomic import publish_entries, staging_folder
from spt_embed.recipe import (
    CHECKPOINTS,
    checkpoint_step,
    is_main_process,
    prepare_run_folder,
    start_run_folder,
    world_size,
)
from spt_embed.training.mining import MINED, check_minable, mine_negatives, save_mined
from spt_embed.training.run_log import JsonlLogCallback, UmaskCheckpoints, plot_log
from spt_embed.training.train_config import TRAIN_CONFIG_NAME, GradedLoss, Method, SelectOn, TrainConfig

if TYPE_CHECKING:
    from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "training.png"
STAGING = "adapter"  # the trained encoder is saved into .adapter.tmp-* first, then moved into the run's folder

# What a checkpoint's tensors are shaped by, or trained on: a resume cannot change these.
FIXED_ON_RESUME = (
    "method", "backbone", "num_tokens", "placement", "readout", "deep_offsets", "tasks", "lora_r", "lora_alpha",
    "lora_targets",
)
# The options one method does not read; a resume does not compare them.
UNUSED_BY = {
    Method.SUFFIX: ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    Method.DEEP_SUFFIX: ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    Method.PROMPT: ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "placement"),
    Method.PREFIX: ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "placement", "readout", "prompt", "tail"),
    Method.LORA: ("num_tokens", "init", "init_text", "placement", "readout", "prompt", "tail"),
}


def checkpoint_weights(method: Method) -> str:
    """The trained weights' file inside a checkpoint, relative to it."""
    from spt_embed.model.config import WEIGHTS_NAME
    from spt_embed.model.lora import LORA_WEIGHTS
    from spt_embed.model.prefix import PREFIX_WEIGHTS

    return {Method.LORA: LORA_WEIGHTS, Method.PREFIX: PREFIX_WEIGHTS}.get(method, WEIGHTS_NAME)


def build_loss(model, config: TrainConfig, dataset=None):
    """InfoNCE (MultipleNegativesRankingLoss, cached with GradCache if asked) for pair and triplet sources; the
    graded loss for a source with a `score` column. One loss, or one per source when they differ (`dataset`: the
    training data, one Dataset or a dict of them by source name)."""
    from spt_embed.training.data import SCORE

    if isinstance(dataset, dict):
        losses = {name: build_loss(model, config, part) for name, part in dataset.items()}
        kinds = {type(loss) for loss in losses.values()}
        return next(iter(losses.values())) if len(kinds) == 1 else losses
    if dataset is not None and SCORE in dataset.column_names:
        from sentence_transformers.sentence_transformer.losses import AnglELoss, CoSENTLoss

        return (AnglELoss if config.graded_loss is GradedLoss.ANGLE else CoSENTLoss)(model)
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    directions = ("query_to_doc", "doc_to_query") if config.symmetric else ("query_to_doc",)
    common: dict[str, Any] = {
        "scale": 1.0 / config.temperature,
        "gather_across_devices": world_size() > 1,
        "directions": directions,
    }
    if config.cached:
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size, **common)
    from spt_embed.training.losses import MergedColumnsMNRL

    return MergedColumnsMNRL(model, **common)


def build_dev_evaluator(config: TrainConfig, retrieval_dev: dict | None = None):
    """STS-B dev; with held-out retrieval rows (`split_retrieval_dev`) also one retrieval evaluation per source,
    together in a SequentialEvaluator whose `sequential_score` is what `config.select_on` selects on."""
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from spt_embed.datafiles import load_sts

    s1, s2, scores = load_sts("dev")
    if config.eval_pairs and config.eval_pairs < len(s1):
        # A seeded random sample: the file is sorted by genre, so its head is all easy captions.
        keep = sorted(random.Random(config.seed).sample(range(len(s1)), config.eval_pairs))
        s1, s2, scores = [s1[i] for i in keep], [s2[i] for i in keep], [scores[i] for i in keep]
    sts = EmbeddingSimilarityEvaluator(s1, s2, scores, name="stsb-dev", batch_size=64, write_csv=False)
    if not retrieval_dev:
        return sts
    from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

    evaluators = [sts, *(retrieval_evaluator(name, rows) for name, rows in retrieval_dev.items())]

    def selected(values: list[float]) -> float:  # values: STS-B dev Spearman, then each retrieval set's nDCG@10
        retrieval = sum(values[1:]) / len(values[1:])
        return {SelectOn.STS: values[0], SelectOn.RETRIEVAL: retrieval}.get(config.select_on, (values[0] + retrieval) / 2)

    return SequentialEvaluator(evaluators, main_score_function=selected)


def retrieval_evaluator(name: str, rows):
    """nDCG@10 (and the rest of sentence-transformers' retrieval metrics) of held-out rows of a retrieval source: each
    query (encode_query) against all their passages and negatives (encode_document); its own passage is relevant."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    corpus: dict[str, str] = {}
    ids: dict[str, str] = {}  # text -> corpus id: a text that is two rows' passage is one document
    for text in [*rows["positive"], *(rows["negative"] if "negative" in rows.column_names else [])]:
        if text not in ids:
            ids[text] = f"d{len(ids)}"
            corpus[ids[text]] = text
    queries = {f"q{i}": query for i, query in enumerate(rows["anchor"])}
    relevant = {f"q{i}": {ids[passage]} for i, passage in enumerate(rows["positive"])}
    return InformationRetrievalEvaluator(
        queries, corpus, relevant, name=f"{name}-dev", batch_size=32, write_csv=False, ndcg_at_k=[10],
        mrr_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[10], map_at_k=[10],
    )


def by_source(dataset, config: TrainConfig) -> tuple[dict, bool]:
    """(training data as {source's dataset name: Dataset}, whether it was one Dataset): load_datasets' result, which
    is a plain Dataset for a single source, in the by-name form; `next(iter(parts.values())) if single else parts`
    turns it back."""
    single = not isinstance(dataset, dict)
    return ({next(iter(source_names(config.data))): dataset} if single else dict(dataset)), single


def split_retrieval_dev(dataset, config: TrainConfig):
    """(training data, held-out rows by source name): `retrieval_dev_rows` seeded rows of every retrieval source
    (router_mapping's) come out of its training data, for `retrieval_evaluator`. Without them: (dataset, {})."""
    if not config.retrieval_dev_rows:
        return dataset, {}
    retrieval = retrieval_sources(config)
    if not retrieval:
        raise ValueError(
            "retrieval_dev_rows is set but no training source is a retrieval source (a retrieval preset such as "
            "squad-qa, or a file named in retrieval_data)."
        )
    parts, single = by_source(dataset, config)
    held_out = {}
    for name in retrieval:
        rows = len(parts[name])
        if rows < config.retrieval_dev_rows + config.batch_size:
            raise ValueError(
                f"Training source {source_names(config.data)[name]} has {rows} rows: too few to hold out "
                f"retrieval_dev_rows={config.retrieval_dev_rows} and keep a batch of {config.batch_size}."
            )
        split = parts[name].train_test_split(test_size=config.retrieval_dev_rows, seed=config.seed, shuffle=True)
        parts[name], held_out[name] = split["train"], split["test"]
        logger.info("Retrieval dev set %s-dev: %d held-out rows of %s", name, len(split["test"]), name)
    return (next(iter(parts.values())) if single else parts), held_out


def oversample(dataset, config: TrainConfig):
    """Each source named in `config.oversample` (SOURCE=N) repeated N times: the proportional sampler then draws its
    batches N times as often. Applied after `split_retrieval_dev`, so held-out rows are never repeated into training."""
    factors = config.oversample_factors()
    if not factors:
        return dataset
    import datasets as hf_datasets

    names = {source: name for name, source in source_names(config.data).items()}
    parts, single = by_source(dataset, config)
    for source, factor in factors.items():
        name = names[source]
        if factor > 1:
            parts[name] = hf_datasets.concatenate_datasets([parts[name]] * factor)
        logger.info("Training source %s repeated %d times: %d rows", source, factor, len(parts[name]))
    return next(iter(parts.values())) if single else parts


DEV_METRIC = "eval_stsb-dev_spearman_cosine"
SELECTED_METRIC = "eval_sequential_score"  # with retrieval dev sets: what config.select_on selects on


def load_datasets(config: TrainConfig):
    """One dataset per source; several sources stay apart so every batch comes from one source (in-batch negatives
    stay within a source and triplet sources keep their hard negatives), sampled in proportion to size."""
    from spt_embed.training.data import load_pairs

    datasets = {}
    for name, source in source_names(config.data).items():
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
        _check_one_batch(datasets[name], source, config)
        logger.info("Training source %s: %d rows, columns %s", source, rows, datasets[name].column_names)
    return next(iter(datasets.values())) if len(datasets) == 1 else datasets


def source_names(sources: list[str]) -> dict[str, str]:
    """The name of each training source's dataset (what the trainer calls its dataset_name), in order."""
    names: dict[str, str] = {}
    for source in sources:
        name = Path(source).stem if Path(source).suffix else Path(source).name
        name = "".join(c if c.isalnum() else "_" for c in name)
        while name in names:
            name += "_"
        names[name] = source
    return names


QUERY, DOCUMENT = "query", "document"  # sentence-transformers' tasks of encode_query / encode_document


def router_mapping(config: TrainConfig) -> dict[str, dict[str, str]] | dict[str, str]:
    """sentence-transformers' `router_mapping`: the task each column of a retrieval source is preprocessed under
    (anchor: query; positive, negative: document), so that it goes through the task's soft prompt and length;
    symmetric sources get no task (the default prompt). Per dataset when there are several sources."""
    columns = {"anchor": QUERY, "positive": DOCUMENT, "negative": DOCUMENT}
    retrieval = retrieval_sources(config)
    if not retrieval:
        return {}
    if len(config.data) == 1:
        return columns
    return {name: columns for name in retrieval}


def retrieval_sources(config: TrainConfig) -> list[str]:
    """Dataset names of the query -> passage sources: retrieval presets and the files named in retrieval_data."""
    return [name for name, source in source_names(config.data).items() if config.is_retrieval_source(source)]


def _check_one_batch(dataset, source: str, config: TrainConfig) -> None:
    """The trainer's no-duplicates sampler (every text of a batch differs: the others are its in-batch negatives)
    must be able to fill one batch, else training runs zero steps. Drawing the first batch is cheap; only data
    that cannot fill one is read through."""
    import torch
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    from spt_embed.training.data import SCORE

    sampler = NoDuplicatesBatchSampler(
        dataset,
        batch_size=config.batch_size,
        drop_last=True,
        valid_label_columns=[SCORE],
        generator=torch.Generator(),
        seed=config.seed,
    )
    if next(iter(sampler), None) is None:
        distinct = len({text for column in dataset.column_names if column != SCORE for text in dataset[column]})
        raise ValueError(
            f"Training source {source}: no batch of {config.batch_size} rows whose texts all differ can be formed "
            f"from its {len(dataset)} rows ({distinct} distinct texts), so training would run 0 steps. In-batch "
            f"negatives need every text of a batch to differ: add rows with other texts, or lower --batch-size."
        )


def build_model(config: TrainConfig):
    """The encoder to train: soft tokens on the frozen backbone (spt; deep-suffix with per-layer offsets), or
    PromptEOL with LoRA on it (lora)."""
    device = "cpu" if not _cuda() else None
    if config.method is Method.LORA:
        from spt_embed.model.config import Readout
        from spt_embed.model.lora import lora_baseline_encoder

        ignored = [f"prompt={config.prompt!r}"] if config.prompt is not None else []
        ignored += [f"readout={config.readout.value!r}"] if config.readout is not Readout.LAST else []
        if ignored:
            logger.warning(
                "method=lora ignores %s: the baseline reads the last token of its own PromptEOL template.",
                ", ".join(ignored),
            )
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
    if config.method is Method.PREFIX:
        from spt_embed.model.config import Init, SuffixPromptConfig
        from spt_embed.model.prefix import prefix_baseline_encoder

        init_text = (config.init_text or SuffixPromptConfig.init_text) if config.init is Init.TEXT else None
        return prefix_baseline_encoder(
            config.backbone,
            num_tokens=config.num_tokens,
            init_text=init_text,
            max_length=config.max_length,
            seed=config.seed,
            device=device,
        )
    from spt_embed.model.encoder import SuffixPromptEncoder

    model = SuffixPromptEncoder.from_backbone(
        config.backbone,
        num_tokens=config.num_tokens,
        init=config.init,
        init_text=config.init_text,
        placement="prefix" if config.method is Method.PROMPT else config.placement,
        tail=config.tail,
        max_length=config.max_length,
        readout=config.readout,
        prompt=config.prompt,
        method="deep-suffix" if config.method is Method.DEEP_SUFFIX else "suffix",
        deep_offsets=config.deep_offsets,
        tasks=config.tasks,
        task_max_length={DOCUMENT: config.document_max_length} if config.document_max_length else None,
        seed=config.seed,
        device=device,
    )
    module = model.prompt_module
    module.recompute_mlp = config.recompute_mlp
    for name in config.freeze_prompts:
        (module.soft_prompt if name == "default" else module.task_prompts[name]).requires_grad_(False)
    return model


def is_run_entry(name: str, saved: dict[str, Any]) -> bool:
    """Whether `name` is an entry a training run writes into its folder (what --overwrite may remove)."""
    from spt_embed.model.baselines import BACKBONE_SUBDIR, BASELINE_CONFIG_NAME, PEFT_SUBDIRS
    from spt_embed.model.config import CONFIG_NAME, WEIGHTS_NAME

    encoder = {"modules.json", "config_sentence_transformers.json", "README.md", CONFIG_NAME, WEIGHTS_NAME}
    encoder |= {BASELINE_CONFIG_NAME, BACKBONE_SUBDIR, *PEFT_SUBDIRS.values()}
    run = {TRAIN_CONFIG_NAME, LOG_NAME, PLOT_NAME, CHECKPOINTS, MINED}
    # "1_Normalize": a sentence-transformers module folder; ".adapter.tmp-*": a save cut short.
    return name in encoder | run or bool(re.fullmatch(r"\d+_\w+|\." + STAGING + r"\.tmp-.*", name))


def train(
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    resume_anyway: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    **options: Any,
):
    """Train a suffix prompt (or the LoRA baseline with method='lora'); returns the trained SentenceTransformer
    (best dev checkpoint when evaluating), also saved to `output`: the adapter only for every method (lora: its
    unmerged peft adapter, lora/; `spt_embed.model.lora.merge_lora_folder` writes a merged copy).

    `spt_embed.train(output="out/enc", data=["snli-triplets"], max_steps=300)` takes the same options as the CLI.
    `output` must be new or empty, or hold an earlier training run: `resume` continues it from its newest complete
    checkpoint (a changed setting is an error, unless `resume_anyway` and it does not change what the checkpoint
    holds), `overwrite` replaces it.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    from spt_embed.model.encoder import default_prompt

    config = config or TrainConfig(**options)
    if not config.output:
        raise ValueError("No output folder: pass output='out/my-encoder' (CLI: --output).")
    output = Path(config.output).expanduser()
    run = prepare_run_folder(
        output,
        config,
        weights=checkpoint_weights(config.method),
        resume=resume,
        overwrite=overwrite,
        owned=is_run_entry,
        fixed=FIXED_ON_RESUME,
        # recompute_mlp changes how a step spends memory, not what it trains: a run may resume with it on or off.
        ignored=(*UNUSED_BY[config.method], "recompute_mlp"),
        resume_anyway=resume_anyway,
    )
    checkpoint = run.checkpoint
    dataset, retrieval_dev = split_retrieval_dev(load_datasets(config), config)
    check_minable(dataset, config)  # before the encoder is loaded
    model = build_model(config)
    # Mined negatives: with the encoder as it starts, over each named source's training rows only (after the dev
    # rows are held out, before the source is repeated); a resume reuses those its run saved.
    dataset, mined = mine_negatives(dataset, model, config, output, reuse=resume)
    dataset = oversample(dataset, config)
    evaluating = config.eval_steps > 0
    evaluator = build_dev_evaluator(config, retrieval_dev) if evaluating else None
    if is_main_process():
        summary = {"mined_negatives": {item.name: item.summary() for item in mined.values()}} if mined else {}
        start_run_folder(output, config, run, log=output / LOG_NAME, **summary)
        save_mined(output, mined)
    cuda = _cuda()
    args = SentenceTransformerTrainingArguments(
        **config.trainer_arguments(output),
        # The encoder's text template (its default prompt, which encode() and the dev evaluator apply): the data
        # collator hands it to the module's preprocess with every column's texts.
        prompts=default_prompt(model),
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_steps or None,
        load_best_model_at_end=evaluating,
        metric_for_best_model=(SELECTED_METRIC if retrieval_dev else DEV_METRIC) if evaluating else None,
        greater_is_better=True,
        # Retrieval sources: queries through the `query` soft prompt, passages through `document`.
        router_mapping=router_mapping(config),
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
        dataloader_drop_last=True,
        use_cpu=not cuda,
        bf16=config.bf16,
        ddp_backend=None if cuda else ("gloo" if world_size() > 1 else None),
        ddp_find_unused_parameters=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=build_loss(model, config, dataset),
        evaluator=evaluator,
        callbacks=[JsonlLogCallback(output / LOG_NAME), UmaskCheckpoints(), *(callbacks or [])],
    )
    start = checkpoint_step(checkpoint) if checkpoint else 0
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step == start < config.max_steps:
        raise ValueError(
            f"Training ran 0 optimiser steps (from step {start}): the data loader gave no batch of "
            f"{config.batch_size} rows whose texts all differ. Nothing was saved as the adapter; add rows with other "
            f"texts, or lower --batch-size."
        )
    if is_main_process():
        _save_encoder(model, output)
        if (output / LOG_NAME).is_file():
            plot_log(output / LOG_NAME, output / PLOT_NAME, DEV_METRIC)
        best = trainer.state.best_metric
        logger.info(
            "Saved the %s to %s%s",
            "LoRA baseline's adapter" if config.method is Method.LORA else "adapter",
            output,
            (f" (best {'STS-B dev Spearman' if not retrieval_dev else 'selection score, ' + config.select_on.value}"
             f" {best:.4f})") if best is not None else "",
        )
    return model


def _save_encoder(model, output: Path) -> None:
    """Save the trained encoder into the run's folder beside its checkpoints and logs: staged first, so that a
    failed save leaves no half-written encoder, and given the umask's permissions (safetensors' writer makes its
    files 0600). A LoRA run resumed from a folder that an earlier spt-embed saved merged loses that stale merged
    copy (backbone/) once its adapter (lora/) is in place."""
    from spt_embed.model.base import BACKBONE_SUBDIR
    from spt_embed.model.lora import LORA_SUBDIR

    staging = staging_folder(output, STAGING)
    try:
        model.save(str(staging))
        published = publish_entries(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stale = output / BACKBONE_SUBDIR
    if LORA_SUBDIR in published and BACKBONE_SUBDIR not in published and stale.is_dir() and not stale.is_symlink():
        source = Path(model[0].backbone_ref.source).expanduser()
        if not (source.is_dir() and source.resolve() == stale.resolve()):  # never the backbone the run trained on
            shutil.rmtree(stale)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
