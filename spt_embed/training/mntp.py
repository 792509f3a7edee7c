"""`spt-embed mntp`: the bidirectional stage (LLM2Vec): causal attention off, LoRA trained with masked next-token
prediction (MNTP, see spt_embed.training.masking), LoRA merged, backbone saved for `spt-embed train --backbone OUT`.

Choices a user should know about:
- The corpus is a plain-text file (one text per line) or jsonl; blank lines are dropped. Texts longer than
  ``max_length`` tokens are truncated (their tail is dropped, the count is logged). A seeded random sample of
  ``eval_lines`` texts is held out to measure the MNTP loss before and after training (``mntp_eval.json``).
- The merged model is saved with its language-model head (as a causal LM; LoRA does not touch the head): the
  folder's config.json records ``is_causal: false``, `load_backbone` reads the base decoder out of it with
  AutoModel, and the folder can also be the starting point of more MNTP.
- Like `spt-embed train`, a run checks its inputs before it writes, and writes only into a new or empty folder or
  one of its own earlier runs (`--resume` continues one, `--overwrite` replaces one).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from spt_embed.atomic import publish_entries, staging_folder, write_json
from spt_embed.recipe import CHECKPOINTS, is_main_process, prepare_run_folder, start_run_folder
from spt_embed.training.masking import IGNORE, MNTPCollator, mntp_loss, resolve_mask_token_id, tokenize_corpus
from spt_embed.training.mntp_config import MNTP_CONFIG_NAME, WIKI1M, MNTPConfig

logger = logging.getLogger(__name__)

EVAL_NAME = "mntp_eval.json"
LOG_NAME = "mntp_log.jsonl"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's LoRA file inside each checkpoint
BACKBONE_FILES = "backbone_files"  # the mntp_config.json key listing the saved backbone's entries
STAGING = "backbone"  # the merged backbone is saved into .backbone.tmp-* first, then moved into the run's folder
# What the LoRA checkpoints are shaped by: a resume cannot change these (the backbone is checked by fingerprint).
FIXED_ON_RESUME = ("lora_r", "lora_alpha", "lora_targets")
WIKI1M_FILE = "wiki1m_prefix/wiki1m_for_simcse.first11914lines.txt"


def load_corpus(corpus: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """Non-empty texts of a plain-text or jsonl file ('wiki1m': the bundled sample); blank lines are dropped."""
    from spt_embed.cli.texts import read_texts
    from spt_embed.datafiles import data_root

    path = data_root() / WIKI1M_FILE if str(corpus) == WIKI1M else Path(corpus).expanduser()
    texts = [text for text in read_texts(path, text_field=text_field) if text.strip()]
    if not texts:
        raise ValueError(f"Corpus {path} has no non-empty text; MNTP needs text to train on.")
    return texts


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Logits (N, V) only at the N positions that predict a masked token, and those tokens (N,).

    The LM head over every position would be (B, L, V) floats (0.8 GB for 32 x 128 tokens on SmolLM2's 49k vocab)
    and a fifth of the step's compute, for the 20 % of positions that carry a label.
    """
    lm = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft: LoRA layers sit inside the base
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    keep = labels != IGNORE  # (B, L)
    return lm.get_output_embeddings()(hidden[keep]), labels[keep]  # (N, V), (N,)


@torch.no_grad()
def heldout_metrics(model, rows, collator: MNTPCollator, batch_size: int, seed: int) -> dict[str, float]:
    """Token-weighted MNTP loss and top-1 accuracy on `rows`, with masks fixed by `seed` (same before and after)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    collator = dataclasses.replace(collator, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    total, correct, count = 0.0, 0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="held-out MNTP loss", leave=False):
        batch = collator(rows[start : start + batch_size])
        logits, targets = target_logits(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)
        )
        total += float(mntp_loss(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1), "targets": count}


# ---------------------------------------------------------------------------------------------------------------
# Training


class MNTPTrainer(Trainer):
    """The HF Trainer with the MNTP loss; the model never sees the labels, so its own causal-LM loss (which
    shifts again) is never computed."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, targets = target_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        loss = mntp_loss(logits, targets)
        return (loss, {"logits": logits}) if return_outputs else loss


def load_causal_lm(spec: str):
    """The backbone as a bidirectional causal LM (the LM head predicts the masked tokens) + tokenizer + base
    fingerprint (equal to load_backbone(spec).ref.fingerprint)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spt_embed.model.backbone import ensure_pad_token, fingerprint, gguf_cache_path, resolve_source
    from spt_embed.model.bidirectional import check_supported, make_bidirectional

    kind, path = resolve_source(spec)
    model_dir = gguf_cache_path(path) if kind == "gguf" else path
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # an auto_map never runs
    check_supported(model_config)  # before loading any weights
    model_config.is_causal = False
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir,
        config=model_config,
        dtype=torch.float32,
        output_loading_info=True,
        trust_remote_code=False,
        use_safetensors=True,
    )
    head = {name for name in info["missing_keys"] if "lm_head" in name}
    if head:
        raise ValueError(
            f"{model_dir} holds a base decoder without its language-model head ({sorted(head)} missing): MNTP "
            f"predicts tokens with that head. Pass the full causal-LM checkpoint (or the GGUF / registered name)."
        )
    make_bidirectional(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ensure_pad_token(tokenizer, model_dir)
    return model, tokenizer, fingerprint(model.get_decoder())


def check_resume_backbone(output: Path, saved: dict[str, Any], config: MNTPConfig, base_fingerprint: str) -> None:
    """Refuse to resume LoRA checkpoints that belong to another backbone (compared by fingerprint, so a moved
    backbone folder still resumes)."""
    if saved.get("base_fingerprint") != base_fingerprint:
        raise ValueError(
            f"The LoRA checkpoints in {output} were trained on backbone {saved.get('backbone')!r} (fingerprint "
            f"{saved.get('base_fingerprint')}), but --backbone {config.backbone!r} has fingerprint {base_fingerprint}. "
            f"Resume with --backbone {saved.get('backbone')!r}, or choose another --output (nothing was changed)."
        )


def is_run_entry(name: str, saved: dict[str, Any]) -> bool:
    """Whether `name` is an entry an mntp run writes into its folder (what --overwrite may remove): its records and
    checkpoints, the entries of the backbone it saved (listed in its config), or a save cut short."""
    run = {MNTP_CONFIG_NAME, LOG_NAME, EVAL_NAME, CHECKPOINTS, *saved.get(BACKBONE_FILES, [])}
    return name in run or name.startswith(f".{STAGING}.tmp-")


def mntp(
    config: MNTPConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    resume_anyway: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    **options: Any,
) -> Path:
    """Train LoRA with bidirectional MNTP, merge it and save the backbone to config.output; returns that folder.

    `spt_embed.mntp(output="out/bi", corpus="texts.txt", max_steps=300)` takes the same options as the CLI.
    `output` must be new or empty, or hold an earlier mntp run: `resume` continues it from its newest complete
    checkpoint (a changed setting is an error, unless `resume_anyway` and it does not change the LoRA shape or the
    backbone), `overwrite` replaces it.
    """
    from peft import LoraConfig
    from transformers import TrainingArguments, set_seed

    from spt_embed.model.backbone import attach_lora
    from spt_embed.training.run_log import JsonlLogCallback, UmaskCheckpoints

    config = dataclasses.replace(config, **options) if config is not None else MNTPConfig(**options)
    if not config.output:
        raise ValueError("No output folder: pass output='out/my-backbone' (CLI: --output).")
    output = Path(config.output).expanduser()
    run = prepare_run_folder(
        output,
        config,
        weights=ADAPTER_WEIGHTS,
        resume=resume,
        overwrite=overwrite,
        owned=is_run_entry,
        fixed=FIXED_ON_RESUME,
        ignored=("backbone",),  # compared by fingerprint once the backbone is loaded
        resume_anyway=resume_anyway,
    )
    checkpoint = run.checkpoint

    texts = load_corpus(config.corpus, text_field=config.text_field)
    if len(texts) <= config.eval_lines:
        raise ValueError(
            f"The corpus has {len(texts)} non-empty texts, not more than --eval-lines {config.eval_lines} held out "
            f"for evaluation; add text or lower --eval-lines (0 skips the held-out evaluation)."
        )
    model, tokenizer, base_fingerprint = load_causal_lm(config.backbone)
    mask_token_id = resolve_mask_token_id(tokenizer, config.mask_token)
    if run.saved is not None and resume:
        check_resume_backbone(output, run.saved, config, base_fingerprint)

    held_out = set(random.Random(config.seed).sample(range(len(texts)), config.eval_lines))
    train_rows = tokenize_corpus(tokenizer, [t for i, t in enumerate(texts) if i not in held_out], config.max_length)
    eval_rows = tokenize_corpus(tokenizer, [t for i, t in enumerate(texts) if i in held_out], config.max_length)
    logger.info(
        "MNTP on %s: %d training texts, %d held out; mask token %r (id %d)",
        config.corpus,
        len(train_rows),
        len(eval_rows),
        tokenizer.convert_ids_to_tokens(mask_token_id),
        mask_token_id,
    )
    collator = MNTPCollator(
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=mask_token_id,
        vocab_size=len(tokenizer),
        mask_prob=config.mask_prob,
        seed=config.seed,
    )

    if is_main_process():
        start_run_folder(output, config, run, log=output / LOG_NAME, base_fingerprint=base_fingerprint)
    evaluate = bool(eval_rows) and is_main_process()
    before = heldout_metrics(model, eval_rows, collator, config.batch_size, config.seed) if evaluate else None
    if before:
        logger.info("Held-out MNTP loss before training: %.4f (accuracy %.4f)", before["loss"], before["accuracy"])

    set_seed(config.seed)  # LoRA's A matrices start random
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
    )
    model = attach_lora(model, lora)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        **config.trainer_arguments(output),
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        remove_unused_columns=False,  # the collator needs special_tokens_mask, which the model does not take
        use_cpu=not cuda,
    )
    trainer = MNTPTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=collator,
        callbacks=[JsonlLogCallback(output / LOG_NAME), UmaskCheckpoints(), *(callbacks or [])],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not is_main_process():
        return output

    merged = trainer.model.merge_and_unload()  # LoRA folded into the weights: a plain causal LM again
    merged.eval()
    after = heldout_metrics(merged, eval_rows, collator, config.batch_size, config.seed) if evaluate else None
    result = {
        "base_fingerprint": base_fingerprint,
        "fingerprint": _fingerprint(merged),
        "steps": trainer.state.global_step,
        BACKBONE_FILES: _save_backbone(merged, tokenizer, output),
    }
    config.save(output, **result, **run.record())
    evaluation = {"heldout_texts": len(eval_rows), "before": before, "after": after, "steps": result["steps"]}
    write_json(output / EVAL_NAME, evaluation)
    if before and after:
        logger.info(
            "Held-out MNTP loss: %.4f before, %.4f after %d steps", before["loss"], after["loss"], result["steps"]
        )
    logger.info("Saved the bidirectional backbone to %s; use it with: spt-embed train --backbone %s", output, output)
    return output


def _fingerprint(model) -> str:
    from spt_embed.model.backbone import fingerprint

    return fingerprint(model.get_decoder())


def _save_backbone(model, tokenizer, output: Path) -> list[str]:
    """Write the merged causal LM (safetensors, config.json with is_causal=false) and tokenizer into `output`;
    returns the entries written. Staged first (and flushed to disk) so that a failed save leaves no half-written
    model next to the checkpoints, and given the umask's permissions (safetensors' writer makes its files 0600)."""
    staging = staging_folder(output, STAGING)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        return publish_entries(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
