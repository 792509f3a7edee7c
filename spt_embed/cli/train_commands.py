"""`spt-embed train` and `mntp`: one flag per field of TrainConfig / MNTPConfig, and thin run functions."""

from __future__ import annotations

import argparse

from spt_embed.cli.options import add_recipe_command, config_from_args
from spt_embed.training.data import PRESETS
from spt_embed.training.mntp_config import MNTPConfig
from spt_embed.training.train_config import TrainConfig


def add_train_parser(subparsers) -> None:
    presets = " Presets: " + "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    description = (
        "Train K soft tokens on a frozen backbone (--method lora: the LoRA baseline on the same backbone instead). "
        "Multi-process: torchrun --nproc_per_node N -m spt_embed train ..."
    )
    add_recipe_command(
        subparsers,
        "train",
        TrainConfig,
        run_train,
        notes={"data": presets},
        help="train a suffix prompt (in-batch InfoNCE, STS-B dev selection)",
        description=description,
    )


def add_mntp_parser(subparsers) -> None:
    description = (
        "Switch causal attention off, train LoRA with masked next-token prediction (LLM2Vec), merge it and save the "
        "backbone; then: spt-embed train --backbone OUTPUT ..."
    )
    add_recipe_command(
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


def run_train(args: argparse.Namespace) -> None:
    from spt_embed.training.train import train

    train(config_from_args(args, TrainConfig), resume=args.resume)


def run_mntp(args: argparse.Namespace) -> None:
    import json

    from spt_embed.training.mntp import EVAL_NAME, mntp

    output = mntp(config_from_args(args, MNTPConfig), resume=args.resume)
    evaluation_path = output / EVAL_NAME
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text(encoding="utf-8"))
        if evaluation["before"] and evaluation["after"]:
            print(
                f"held-out MNTP loss {evaluation['before']['loss']:.4f} -> {evaluation['after']['loss']:.4f} "
                f"({evaluation['heldout_texts']} texts)"
            )
    print(f"saved the bidirectional backbone to {output}: spt-embed train --backbone {output} ...")
