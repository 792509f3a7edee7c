"""The `spt-embed` command line: thin wiring of library functions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("spt_embed")


def _cmd_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from spt_embed.model.encoder import open_encoder
    from spt_embed.cli.texts import read_texts

    output = Path(args.output)
    if output.suffix != ".npy":
        raise ValueError(f"--output must end in .npy, got {output}.")
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")
    texts = read_texts(args.input, text_field=args.text_field)
    model = open_encoder(args.model, dtype=args.dtype)
    embeddings = model.encode(
        texts, batch_size=args.batch_size, prompt=args.prompt, show_progress_bar=True, convert_to_numpy=True
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, suffix=".npy", delete=False) as handle:
        np.save(handle, embeddings.astype(np.float32))
    os.replace(handle.name, output)  # atomic: an interrupted run never leaves a truncated .npy
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {output}")


def _cmd_info(args: argparse.Namespace) -> None:
    from spt_embed.model.encoder import load

    model = load(args.model)
    module = model.prompt_module
    ref, cfg = module.backbone_ref, module.spt_config
    trainable = module.soft_prompt.numel()
    total = trainable + sum(p.numel() for p in module.backbone.parameters())
    rows = [
        ("backbone", ref.source),
        ("model type", ref.model_type),
        ("fingerprint", ref.fingerprint),
        ("attention", "causal" if module.is_causal else "bidirectional"),
        ("hidden size", f"{ref.hidden_size}"),
        ("soft tokens (K)", f"{cfg.num_tokens}"),
        ("placement", cfg.placement.value),
        ("init", cfg.init.value + (f" ({cfg.init_text!r})" if cfg.init.value == "text" else "")),
        ("max length", f"{cfg.max_length} (text + soft tokens)"),
        ("normalised", "yes" if len(model) > 1 else "no"),
        ("trainable parameters", f"{trainable:,}"),
        ("total parameters", f"{total:,}"),
        ("trainable share", f"{100 * trainable / total:.4f} %"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _cmd_export(args: argparse.Namespace) -> None:
    from spt_embed.model.export import export

    out = export(args.model, args.output, overwrite=args.overwrite)
    print(f"exported {args.model} to {out}: load it with SentenceTransformer({str(out)!r})")


def _cmd_train(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from spt_embed.training.train import train
    from spt_embed.training.train_config import TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = TrainConfig.from_sources(args.config, **overrides)
    train(config, resume=args.resume)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags (None) leave the YAML recipe or the default in place."""
    from dataclasses import MISSING, fields

    from spt_embed.training.data import PRESETS
    from spt_embed.training.train_config import TrainConfig

    parser.add_argument("--config", help="YAML recipe; flags given on the command line override its values")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        help_text = f"{f.metadata['help']} (default: {getattr(default, 'value', default)})"
        if f.name == "data":
            help_text += " Presets: " + "; ".join(f"{n}: {p.description}" for n, p in PRESETS.items())
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            annotation = str(f.type)  # a string under `from __future__ import annotations`, e.g. "int | None"
            kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spt-embed", description="Suffix prompt tuning: a frozen decoder LLM as a text encoder."
    )
    from spt_embed.model.encoder import add_dtype_argument

    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser("encode", help="encode texts to a .npy matrix (one row per input text)")
    enc.add_argument("--model", required=True, help="adapter folder, bundled adapter name or SentenceTransformer folder")
    enc.add_argument("--input", required=True, help="texts: one per line, or .jsonl with a text field")
    enc.add_argument("--output", required=True, help="where to write the (N, dim) float32 .npy")
    enc.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    enc.add_argument("--prompt", default=None, help="instruction prepended to every text")
    enc.add_argument("--batch-size", type=int, default=32)
    add_dtype_argument(enc)
    enc.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    enc.set_defaults(func=_cmd_encode)

    info = sub.add_parser("info", help="describe an adapter: backbone, K, trainable parameters")
    info.add_argument("model", help="adapter folder or bundled adapter name")
    info.set_defaults(func=_cmd_info)

    tr = sub.add_parser(
        "train",
        help="train a suffix prompt (in-batch InfoNCE, STS-B dev selection)",
        description="Train K soft tokens on a frozen backbone (--method lora: the LoRA baseline on the same "
        "backbone instead). Multi-process: torchrun --nproc_per_node N -m spt_embed train ...",
    )
    _add_train_options(tr)
    tr.set_defaults(func=_cmd_train)

    from spt_embed.training.mntp import add_mntp_parser

    add_mntp_parser(sub)

    exp = sub.add_parser("export", help="write a plain SentenceTransformer folder (no custom code needed to load)")
    exp.add_argument("model", help="adapter folder or bundled adapter name")
    exp.add_argument("output", help="output folder")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    exp.set_defaults(func=_cmd_export)

    from spt_embed.evaluation.evaluate import add_eval_parser

    add_eval_parser(sub)

    from spt_embed.cli.index import add_index_parsers

    add_index_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as exc:
        print(f"spt-embed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
