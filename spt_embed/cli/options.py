"""Options shared by several `spt-embed` commands: `--dtype`, and one flag per field of a run's config dataclass.

Nothing here imports torch: the parser is built (for `--help` too) before any command runs.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from spt_embed.recipe import RecipeConfig, enum_text

# The names of spt_embed.model.dtypes.DTYPES, which maps them to torch dtypes.
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
MODEL_HELP = "adapter folder, bundled adapter name or SentenceTransformer folder"
# The values of spt_embed.model.export.ExportBackend: what runs a model (export writes the files of the last two).
BACKEND_CHOICES = ("torch", "onnx", "openvino")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """The `--dtype` option of the commands that encode."""
    parser.add_argument(
        "--dtype",
        choices=[*DTYPE_CHOICES, "auto"],
        default="float32",
        help="weights' dtype while encoding (default float32); bfloat16 measured 1.6-3.2x faster on CPUs with AVX512-BF16 "
        "or AMX and about 6x slower on CPUs that only emulate it; auto picks bfloat16 only where it is native. "
        "Embeddings stay float32",
    )


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """The `--backend` option of the commands that encode: what runs an exported model."""
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="torch",
        help="torch (default), or the onnx / openvino model file that `spt-embed export --backend ...` wrote into "
        "the --model folder, run by sentence-transformers' backend on the CPU (OpenVINO computes in bfloat16 by "
        "itself on CPUs with AMX or AVX512-BF16); needs the matching extra",
    )


def add_recipe_command(
    subparsers,
    name: str,
    config_cls: type[RecipeConfig],
    run: Callable[[argparse.Namespace], None],
    *,
    negatable: bool = False,
    enum_choices: bool = False,
    aliases: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
    **parser_options: Any,
) -> argparse.ArgumentParser:
    """Command `name` running `run`, with `--config` (a YAML recipe), `--resume`, and one flag per field of
    `config_cls` (a RecipeConfig dataclass); `parser_options` (help, description) go to `add_parser`.

    Every flag defaults to None, so that an unset flag leaves the recipe's value or the field's default in place;
    the help shows the field's default. `negatable`: booleans get a `--no-` form (else only `--flag`, setting True).
    `enum_choices`: enum fields list their values as argparse choices (else the config checks them). `aliases`:
    an extra flag per field name; `notes`: text appended to a field's help.
    """
    aliases, notes = aliases or {}, notes or {}
    parser = subparsers.add_parser(name, **parser_options)
    parser.set_defaults(func=run)
    parser.add_argument("--config", help="YAML recipe; flags given on the command line override its values")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    for f in fields(config_cls):
        flags = ["--" + f.name.replace("_", "-")]
        if f.name in aliases:
            flags.append(aliases[f.name])
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        options: dict[str, Any] = {
            "dest": f.name,
            "default": None,
            "help": f"{f.metadata['help']} (default: {enum_text(default)}){notes.get(f.name, '')}",
        }
        if isinstance(default, bool):
            options["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
        elif isinstance(default, list):
            options["nargs"] = "+"
        elif isinstance(default, enum.Enum) and enum_choices:
            options["choices"] = [member.value for member in type(default)]
        else:
            annotation = str(f.type)  # a string under `from __future__ import annotations`, e.g. "int | None"
            options["type"] = int if annotation.startswith("int") else float if annotation.startswith("float") else str
        parser.add_argument(*flags, **options)
    return parser


def config_from_args(args: argparse.Namespace, config_cls: type[RecipeConfig]) -> Any:
    """The config of a run: the `--config` recipe with the flags that were given on top."""
    overrides = {f.name: getattr(args, f.name) for f in fields(config_cls)}
    return config_cls.from_sources(args.config, **overrides)
