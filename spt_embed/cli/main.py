"""The `spt-embed` command line: thin wiring of library functions.

Building the parser imports no torch, transformers, mteb or faiss (`spt-embed --help` stays fast); each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from spt_embed.cli.eval_commands import add_eval_parser
from spt_embed.cli.index_commands import add_index_parsers
from spt_embed.cli.model_commands import (
    add_encode_parser,
    add_export_parser,
    add_info_parser,
    add_merge_lora_parser,
)
from spt_embed.cli.train_commands import add_mntp_parser, add_train_parser

# In the order `spt-embed --help` lists the commands.
_COMMANDS = (
    add_encode_parser,
    add_info_parser,
    add_train_parser,
    add_mntp_parser,
    add_export_parser,
    add_merge_lora_parser,
    add_eval_parser,
    add_index_parsers,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spt-embed", description="Suffix prompt tuning: a frozen decoder LLM as a text encoder."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in _COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, ConnectionError, ImportError) as exc:
        print(f"spt-embed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
