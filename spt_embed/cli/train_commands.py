"""`spt-embed train` and `mntp`: one flag per field of TrainConfig / MNTPConfig, and thin run functions.

Ctrl-C during a run keeps its checkpoints and prints the command that continues it (exit status 130).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from spt_embed.cli.options import add_recipe_command, config_from_args
from spt_embed.recipe import CHECKPOINTS, RecipeConfig, latest_checkpoint
from spt_embed.training.data import PRESETS
from spt_embed.training.mntp_config import MNTPConfig
from spt_embed.training.train_config import TrainConfig


def add_train_parser(subparsers) -> None:
    presets = " Presets: " + "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    description = (
        "Train K soft tokens on a frozen backbone (--method lora: the LoRA baseline on the same backbone instead). "
        "Multi-process: torchrun --nproc_per_node N -m spt_embed train ..."
    )
    parser = add_recipe_command(
        subparsers,
        "train",
        TrainConfig,
        run_train,
        notes={"data": presets},
        help="train a suffix prompt (in-batch InfoNCE, STS-B dev selection)",
        description=description,
    )
    _add_run_folder_flags(parser, "training")


def add_mntp_parser(subparsers) -> None:
    description = (
        "Switch causal attention off, train LoRA with masked next-token prediction (LLM2Vec), merge it and save the "
        "backbone; then: spt-embed train --backbone OUTPUT ..."
    )
    parser = add_recipe_command(
        subparsers,
        "mntp",
        MNTPConfig,
        run_mntp,
        negatable=True,
        enum_choices=True,
        aliases={"max_steps": "--steps"},
        help="bidirectional stage: LoRA + masked next-token prediction, merged into a new backbone",
        description=description,
    )
    _add_run_folder_flags(parser, "mntp")


def _add_run_folder_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the earlier {kind} run in --output (any other non-empty folder is refused)",
    )
    parser.add_argument(
        "--resume-anyway",
        action="store_true",
        help="with --resume: continue although settings changed since the checkpoint (each change is logged); "
        "changes to what the checkpoint holds (its backbone, method, soft tokens or LoRA shape) stay errors",
    )


def run_train(args: argparse.Namespace) -> None:
    from spt_embed.training.train import checkpoint_weights, train

    config = config_from_args(args, TrainConfig)
    with _resumable(args, config, checkpoint_weights(config.method)):
        train(config, resume=args.resume, overwrite=args.overwrite, resume_anyway=args.resume_anyway)


def run_mntp(args: argparse.Namespace) -> None:
    import json

    from spt_embed.training.mntp import ADAPTER_WEIGHTS, EVAL_NAME, mntp

    config = config_from_args(args, MNTPConfig)
    with _resumable(args, config, ADAPTER_WEIGHTS):
        output = mntp(config, resume=args.resume, overwrite=args.overwrite, resume_anyway=args.resume_anyway)
    evaluation_path = output / EVAL_NAME
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text(encoding="utf-8"))
        if evaluation["before"] and evaluation["after"]:
            print(
                f"held-out MNTP loss {evaluation['before']['loss']:.4f} -> {evaluation['after']['loss']:.4f} "
                f"({evaluation['heldout_texts']} texts)"
            )
    print(f"saved the bidirectional backbone to {output}: spt-embed train --backbone {output} ...")


@contextlib.contextmanager
def _resumable(args: argparse.Namespace, config: RecipeConfig, weights: str) -> Iterator[None]:
    """Turn Ctrl-C during a run into a message naming the checkpoint kept and the command that continues the run,
    and exit status 130 (128 + SIGINT), instead of a KeyboardInterrupt traceback."""
    try:
        yield
    except KeyboardInterrupt:
        folder = Path(config.output).expanduser() / CHECKPOINTS
        checkpoint = latest_checkpoint(folder.parent, weights) if folder.is_dir() else None
        kept = (
            f"its checkpoints in {folder} are kept; the newest complete one is {checkpoint.name}"
            if checkpoint
            else f"no checkpoint was written yet (one every {config.save_steps} steps), so --resume starts over"
        )
        print(
            f"spt-embed {args.command}: interrupted; {kept}. Continue the run with:\n  {_resume_command(args, config)}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def _resume_command(args: argparse.Namespace, config: RecipeConfig) -> str:
    """The command line that continues this run: its recipe and the flags it was given, with --resume."""
    words = ["spt-embed", args.command, *(["--config", args.config] if args.config else [])]
    for f in fields(config):
        value = getattr(args, f.name, None)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join([*words, *(["--resume-anyway"] if args.resume_anyway else []), "--resume"])
