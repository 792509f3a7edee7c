"""`spt-embed eval`: the argument parser and a thin run function over spt_embed.evaluation.evaluate."""

from __future__ import annotations

import argparse

from spt_embed.cli.options import add_dtype_argument
from spt_embed.evaluation.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_TASKS, TASK_GROUPS, evaluate
from spt_embed.model.specs import REFERENCE_ENCODERS

# The values of spt_embed.model.baselines.Baseline, whose module loads torch.
BASELINE_CHOICES = ("mean", "last", "prompteol")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an encoder on MTEB tasks (offline local tasks or any mteb task)",
        description="Run MTEB tasks and write mteb result files (one <Task>.json per task) to --output. Local tasks "
        f"(bundled data, offline): {', '.join(DEFAULT_TASKS)}. Any other mteb task name downloads from the hub.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="adapter folder or bundled adapter name, SentenceTransformer folder, "
        f"{' / '.join(REFERENCE_ENCODERS)}, or a backbone (with --baseline)",
    )
    parser.add_argument(
        "--baseline",
        choices=list(BASELINE_CHOICES),
        default=None,
        help="zero-shot baseline of a backbone: mean pooling, last token, or the PromptEOL template",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_TASKS),
        help=f"task names (default: {' '.join(DEFAULT_TASKS)}); groups: "
        + "; ".join(f"{name} = {' '.join(tasks)}" for name, tasks in TASK_GROUPS.items()),
    )
    parser.add_argument("--output", required=True, help="results folder for this model, e.g. eval/results/<name>")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to evaluate instead of each task's own "
                        "(e.g. validation: STS-B dev, for model selection)")
    parser.add_argument("--query-prompt", default=None, help="text prepended to retrieval queries")
    parser.add_argument("--document-prompt", default=None, help="text prepended to retrieval documents")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    add_dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="recompute results already in --output")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> None:
    scores = evaluate(
        args.model,
        args.tasks,
        args.output,
        baseline=args.baseline,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        query_prompt=args.query_prompt,
        document_prompt=args.document_prompt,
        eval_splits=args.splits,
        dtype=args.dtype,
    )
    width = max(len(name) for name in scores)
    for name, score in scores.items():
        print(f"{name:<{width}}  {100 * score:6.2f}")
    print(f"results in {args.output}")
