"""`spt-embed encode`, `info`, `export` and `merge-lora`: argument parsers and thin run functions over one encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from spt_embed.cli.options import BACKEND_CHOICES, MODEL_HELP, add_backend_argument, add_dtype_argument


def add_encode_parser(subparsers) -> None:
    enc = subparsers.add_parser("encode", help="encode texts to a .npy matrix (one row per input text)")
    enc.add_argument("--model", required=True, help=MODEL_HELP)
    enc.add_argument(
        "--input",
        required=True,
        help="texts: .txt (one per line), .jsonl, .json (array of strings or objects), or .csv/.tsv with a header",
    )
    enc.add_argument("--output", required=True, help="where to write the (N, dim) float32 .npy")
    enc.add_argument(
        "--text-field", default="text", help="field (.jsonl/.json) or column (.csv/.tsv) with the text (default: text)"
    )
    enc.add_argument(
        "--prompt",
        default=None,
        help="instruction prepended to every text (inside the encoder's own text template, if it has one)",
    )
    enc.add_argument("--batch-size", type=int, default=32)
    add_dtype_argument(enc)
    add_backend_argument(enc)
    enc.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    enc.set_defaults(func=run_encode)


def add_info_parser(subparsers) -> None:
    info = subparsers.add_parser("info", help="describe an adapter: backbone, K, readout, trainable parameters")
    info.add_argument("model", help="adapter folder or bundled adapter name")
    info.set_defaults(func=run_info)


def add_export_parser(subparsers) -> None:
    exp = subparsers.add_parser(
        "export", help="write a plain SentenceTransformer folder (no custom code needed to load)"
    )
    exp.add_argument("model", help="adapter folder or bundled adapter name")
    exp.add_argument("output", help="output folder: new, empty, or an earlier export (with --overwrite)")
    exp.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export (a folder holding spt_export.json)"
    )
    exp.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="torch",
        help="torch (default): the plain folder; onnx / openvino: also the files SentenceTransformer(OUT, "
        "backend=...) loads, made by sentence-transformers' exporters (needs pip install 'spt-embed[onnx]' or "
        "'spt-embed[openvino]')",
    )
    exp.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8 model files for --backend onnx (ONNX Runtime dynamic quantisation) or openvino (NNCF static "
        "quantisation, calibrated on --calibration)",
    )
    exp.add_argument(
        "--calibration",
        default=None,
        metavar="TEXTS",
        help="texts (formats as encode --input, field 'text') that --backend openvino --quantize int8 calibrates "
        "on (default: 300 STS-B train sentences)",
    )
    exp.set_defaults(func=run_export)


def add_merge_lora_parser(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge-lora",
        help="write a LoRA baseline (train --method lora) with its LoRA merged into a full copy of the backbone",
        description="Fold the LoRA adapter of a folder that `spt-embed train --method lora` wrote (or one of its "
        "checkpoints) into the backbone's weights and save the result as a new folder with a full copy of the "
        "backbone (backbone/): it loads without peft and encodes as a plain decoder. The adapter folder stays as "
        "it is; `encode`, `eval` and `index` merge in memory by themselves, so they need no merged copy.",
    )
    merge.add_argument("model", help="the LoRA run's folder (or one of its checkpoints)")
    merge.add_argument("output", help="output folder: new or empty, outside the LoRA folder")
    merge.set_defaults(func=run_merge_lora)


def run_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from spt_embed.atomic import atomic_file
    from spt_embed.cli.texts import read_texts
    from spt_embed.model.encoder import compose_prompt, open_encoder

    output = Path(args.output)
    if output.suffix != ".npy":
        raise ValueError(f"--output must end in .npy, got {output}.")
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")
    texts = read_texts(args.input, text_field=args.text_field)
    model = open_encoder(args.model, dtype=args.dtype, backend=args.backend)
    embeddings = model.encode(
        texts,
        batch_size=args.batch_size,
        prompt=compose_prompt(model, args.prompt),
        show_progress_bar=True,
        convert_to_numpy=True,
    )
    with atomic_file(output, "wb") as handle:  # an interrupted run never leaves a truncated .npy
        np.save(handle, embeddings.astype(np.float32))
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {output}")


def run_info(args: argparse.Namespace) -> None:
    from spt_embed.model.encoder import default_prompt, load

    model = load(args.model)
    if not hasattr(model, "prompt_module"):  # method=prefix or lora: a baseline with a peft adapter
        _print_rows(_baseline_rows(model))
        return
    module = model.prompt_module
    ref, cfg = module.backbone_ref, module.spt_config
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)  # soft tokens (+ layer-mix weights, offsets)
    total = sum(p.numel() for p in module.parameters())
    template = default_prompt(model)
    rows = [
        ("backbone", ref.source),
        ("model type", ref.model_type),
        ("fingerprint", ref.fingerprint),
        ("attention", "causal" if module.is_causal else "bidirectional"),
        ("hidden size", f"{ref.hidden_size}"),
        ("method", cfg.method.value),
        *((("deep offsets", f"{cfg.deep_offsets.value} (at the soft positions, every layer)"),)
          if cfg.method.value == "deep-suffix" else ()),
        ("soft tokens (K)", f"{cfg.num_tokens}"),
        ("placement", cfg.placement.value),
        ("init", cfg.init.value + (f" ({cfg.init_text!r})" if cfg.init.value == "text" else "")),
        ("readout", cfg.readout.value),
        ("text template", f"{template!r} before every text" if template else "none"),
        *((("text tail", f"{cfg.tail!r} after every text, kept when a text is cut"),) if cfg.tail else ()),
        ("max length", f"{cfg.max_length} (text + soft tokens)"),
        *((("task max length", ", ".join(f"{task} {n}" for task, n in cfg.task_max_length.items())),)
          if cfg.task_max_length else ()),
        (
            "soft prompts",
            f"default + {', '.join(cfg.tasks)} (encode_query / encode_document use theirs)" if cfg.tasks else "one",
        ),
        ("normalised", "yes" if len(model) > 1 else "no"),
        ("trainable parameters", f"{trainable:,}"),
        ("total parameters", f"{total:,}"),
        ("trainable share", f"{100 * trainable / total:.4f} %"),
    ]
    _print_rows(rows)


def _baseline_rows(model) -> list[tuple[str, str]]:
    """`info` for a baseline folder: the PromptEOL encoder and its prefix or LoRA adapter (or merged weights)."""
    module = model[0]
    ref = module.backbone_ref
    kind = module.peft_kind
    total = sum(p.numel() for p in module.parameters())  # the backbone's, and an adapter's
    lora, share_of = None, total
    if kind is not None:
        method, trained = kind, module.adapter_parameters()
        lora = module.lora_summary() if kind == "lora" else None
    elif module.trained_from is not None:
        method, lora = "lora (merged into the backbone's weights)", module.merged_lora
        # What was merged, as merge_lora recorded it; folders merged before it was recorded: not countable.
        trained = lora.get("parameters") if lora and isinstance(lora.get("parameters"), int) else None
        share_of = total + (trained or 0)  # the share as before the merge: of the backbone and the LoRA
    else:
        method, trained = f"zero-shot {module.baseline.value}", 0
    rows = [
        ("backbone", ref.source),
        ("model type", ref.model_type),
        ("fingerprint", ref.fingerprint),
        ("hidden size", f"{ref.hidden_size}"),
        ("method", method),
        ("text template", module.baseline.template),
        ("readout", f"{module.baseline.pooling} token" if module.baseline.pooling == "last" else "mean"),
        ("max length", f"{module.max_seq_length}"),
        ("normalised", "yes" if len(model) > 1 else "no"),
    ]
    if kind == "prefix":
        rows.append(("prefix tokens", f"{module.backbone.active_peft_config.num_virtual_tokens} at every layer"))
    if lora:
        targets = lora.get("targets")
        on = ", ".join(map(str, targets)) if isinstance(targets, list) else str(targets)
        merged = " (merged)" if kind is None else ""
        rows.append(("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')} on {on}{merged}"))
    if trained is None:
        rows.append(("trained parameters", "merged: the attention projections changed (not countable apart)"))
    else:
        rows += [("trained parameters", f"{trained:,}"), ("trained share", f"{100 * trained / share_of:.4f} %")]
    rows.append(("total parameters", f"{total:,}"))
    return rows


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def run_export(args: argparse.Namespace) -> None:
    from spt_embed.cli.texts import read_texts
    from spt_embed.model.export import export

    calibration = read_texts(args.calibration) if args.calibration else None
    try:
        out = export(
            args.model,
            args.output,
            overwrite=args.overwrite,
            backend=args.backend,
            quantize=args.quantize,
            calibration_texts=calibration,
        )
    except ImportError as exc:  # a backend's optional packages: reported like the command's other errors
        raise ValueError(str(exc)) from exc
    backend = "" if args.backend == "torch" else f", backend={args.backend!r}"
    print(f"exported {args.model} to {out}: load it with SentenceTransformer({str(out)!r}{backend})")


def run_merge_lora(args: argparse.Namespace) -> None:
    from spt_embed.model.lora import merge_lora_folder

    out = merge_lora_folder(args.model, args.output)
    print(f"merged the LoRA of {args.model} into {out / 'backbone'}: load it with spt_embed.load({str(out)!r})")
