"""What every training recipe shares: a config dataclass filled from a YAML recipe and flag overrides (every value
checked against its field's type), written out resolved (with the library version) into the run's folder; enum
parsing; the process rank; the run's folder (used only when new, empty or an earlier run of the same kind, and
written only once every check passed); and the checkpoint to resume from (the newest complete one, with settings
compared against the run that wrote it, never running over another run's checkpoints)."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import os
import shutil
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from spt_embed.atomic import write_json

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=enum.Enum)

CHECKPOINTS = "checkpoints"  # the trainer's checkpoint-N folders, inside the run's output folder


def parse_enum(enum_cls: type[E], value: Any, name: str) -> E:
    """`value` (a member or its string value) as a member of `enum_cls`; an error listing the choices otherwise."""
    try:
        return enum_cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}.") from None


def enum_text(value: Any) -> str:
    """The string form of an enum member (its value) or of a plain string."""
    return str(value.value if isinstance(value, enum.Enum) else value)


class Scheduler(str, enum.Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant_with_warmup"


class RecipeConfig:
    """What a run's config dataclass shares: YAML recipe + overrides in, resolved JSON out (the version recorded)."""

    file_name: ClassVar[str]  # the JSON written into the output folder
    option_kind: ClassVar[str]  # for errors: "Unknown <kind> option(s)"

    def check_types(self) -> None:
        """Check every field against its annotation; the first thing a config's __post_init__ does, since a YAML
        recipe (or a Python caller) can put any type under any key. Coerces only what is unambiguous: an int, or a
        numeric string, where a float is expected (YAML 1.1 reads `1e-3`, an exponent without a dot, as a string);
        one string where a list of strings is; an enum's value to its member."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name], self.option_kind))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, enum.Enum):
                data[key] = value.value
        return data

    def trainer_arguments(self, output: str | Path) -> dict[str, Any]:
        """The HF TrainingArguments every recipe sets the same way from its fields (max_steps, batch_size, lr,
        weight_decay, warmup_steps, scheduler, logging_steps, save_steps, save_total_limit, seed): schedule,
        checkpoints in `output`/checkpoints, seeds; logs only from the main process."""
        return {
            "output_dir": str(Path(output) / CHECKPOINTS),
            "max_steps": self.max_steps,
            "per_device_train_batch_size": self.batch_size,
            "learning_rate": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "lr_scheduler_type": enum_text(self.scheduler),
            "logging_steps": self.logging_steps,
            "save_strategy": "steps",
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "seed": self.seed,
            "data_seed": self.seed,
            "report_to": "none",
            "disable_tqdm": not is_main_process(),
        }

    def save(self, directory: str | Path, **extra: Any) -> None:
        from spt_embed._version import __version__

        write_json(Path(directory) / self.file_name, {**self.to_dict(), **extra, "spt_embed_version": __version__})

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, **overrides: Any):
        """A YAML recipe (if any) with explicit overrides on top; unknown keys are errors."""
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(_read_yaml(Path(yaml_path)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.option_kind} option(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"Training config {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got {type(values).__name__}.")
    return values


_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _is_a(annotation: type, value: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float) and isinstance(value, bool):  # bool is an int subclass: True is not a count
        return False
    if annotation is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, annotation)


def _typed(name: str, value: Any, annotation: Any, kind: str) -> Any:
    """`value` as the type `annotation` names (see RecipeConfig.check_types); an error naming the key, the value
    and the type expected otherwise."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):
            value = [value]
        item = typing.get_args(annotation)[0]
        if isinstance(value, (list, tuple)) and all(_is_a(item, v) for v in value):
            return list(value)
        expected = "a list of strings" if item is str else f"a list of {item.__name__} values"
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, (str, enum.Enum)):
            return parse_enum(annotation, value, name)
        expected = "one of " + ", ".join(repr(m.value) for m in annotation)
    elif annotation in _EXPECTED:
        if annotation is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if _is_a(annotation, value):
            return float(value) if annotation is float else value
        expected = _EXPECTED[annotation]
    else:
        return value
    raise ValueError(
        f"{kind.capitalize()} option {name}={value!r} ({type(value).__name__}) is not valid: expected {expected}"
        f"{' or null' if optional else ''}. Fix it in the YAML recipe, or pass --{name.replace('_', '-')}."
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def latest_checkpoint(output: Path, weights: str) -> Path | None:
    """The newest checkpoint in `output`/checkpoints whose trainer state, trained weights (`weights`, a
    safetensors file relative to the checkpoint), optimiser and scheduler are all there and readable; a
    half-written one (killed mid-save) is skipped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(output) / CHECKPOINTS
    candidates = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    for candidate in candidates:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            load_file(str(candidate / weights))
            if not (candidate / "optimizer.pt").is_file() or not (candidate / "scheduler.pt").is_file():
                raise FileNotFoundError("optimizer or scheduler state missing")
        except (OSError, ValueError, SafetensorError) as exc:
            logger.warning("Skipping incomplete checkpoint %s (%s)", candidate, exc)
            continue
        return candidate
    return None


def has_checkpoints(output: str | Path) -> bool:
    """Whether a run in `output` has written anything under its checkpoints folder (complete or not)."""
    folder = Path(output) / CHECKPOINTS
    return folder.is_dir() and any(folder.iterdir())


def resume_checkpoint(output: Path, weights: str, *, resume: bool) -> Path | None:
    """The checkpoint a run into `output` continues from. With `resume`: the newest complete one, or None (with
    a warning) when there is none. Without: None, and checkpoints already in `output` are an error, so a run never
    silently restarts over another's checkpoints."""
    folder = Path(output) / CHECKPOINTS
    if not resume:
        if has_checkpoints(output):
            raise FileExistsError(
                f"{folder} already holds checkpoints; pass --resume to continue that run, --overwrite to replace "
                f"it, or choose another --output (nothing was overwritten)."
            )
        return None
    checkpoint = latest_checkpoint(output, weights)
    if checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch.", folder)
    return checkpoint


def checkpoint_step(checkpoint: Path) -> int:
    """The optimiser step a checkpoint was written at."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


# ---------------------------------------------------------------------------------------------------------------
# The run's folder


def previous_run(output: Path, config_cls: type[RecipeConfig]) -> dict[str, Any] | None:
    """The saved config of the earlier run in `output`: its `config_cls.file_name`, a JSON object that records the
    spt-embed version (so written by us). None when `output` does not exist or is empty; an error for a file, or a
    non-empty folder without that record (a folder of the user's, which no run may write into)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; pass a new or empty folder.")
    if not output.is_dir() or not any(output.iterdir()):
        return None
    try:
        saved = json.loads((output / config_cls.file_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or "spt_embed_version" not in saved:
        raise FileExistsError(
            f"--output {output} is not empty and is not an earlier spt-embed {config_cls.option_kind} run (it has no "
            f"{config_cls.file_name} written by spt-embed). Nothing was written; pass a new or empty folder "
            f"(--overwrite replaces only earlier runs)."
        )
    return saved


@dataclass(frozen=True)
class RunFolder:
    """What `prepare_run_folder` found in a run's output folder, and so what `start_run_folder` does there."""

    checkpoint: Path | None  # the checkpoint to resume from
    saved: dict[str, Any] | None  # the earlier run's saved config
    changed: dict[str, list[Any]]  # settings this resumed run changed: {field: [before, now]}
    replace: bool  # the earlier run is to be removed

    def record(self) -> dict[str, Any]:
        """What the run's saved config adds about a resume: the step resumed from and the settings changed."""
        if self.checkpoint is None:
            return {}
        return {"resumed_from_step": checkpoint_step(self.checkpoint), "changed_on_resume": self.changed}


def prepare_run_folder(
    output: Path,
    config: RecipeConfig,
    *,
    weights: str,
    resume: bool,
    overwrite: bool,
    owned: Callable[[str, dict[str, Any]], bool],
    fixed: Collection[str],
    ignored: Collection[str] = (),
    resume_anyway: bool = False,
) -> RunFolder:
    """Check, before anything is written, that this run may use `output`: a new or empty folder; with `resume` an
    earlier run of the same kind to continue (its settings compared with this run's, see `resume_changes`); with
    `overwrite` an earlier run to replace, holding nothing but entries such runs write (`owned(name, its saved
    config)`). `weights`: the trained weights' file inside a checkpoint."""
    if resume and overwrite:
        raise ValueError(f"--resume continues the run in {output}, --overwrite replaces it: pass one of them.")
    if not is_main_process():  # the main process checks and writes the folder (racing it here could misjudge it)
        return RunFolder(
            checkpoint=latest_checkpoint(output, weights) if resume else None, saved=None, changed={}, replace=False
        )
    saved = previous_run(output, type(config))
    if saved is not None and overwrite:
        foreign = sorted(name for name in os.listdir(output) if not owned(name, saved))
        if foreign:
            raise FileExistsError(
                f"--overwrite: {output} holds an earlier {config.option_kind} run, but also {foreign}, which no "
                f"run writes; move them out of the folder, or choose another --output (nothing was changed)."
            )
        return RunFolder(checkpoint=None, saved=saved, changed={}, replace=True)
    if saved is not None and not resume:
        resume_checkpoint(output, weights, resume=False)  # the error for a folder with checkpoints
        raise FileExistsError(
            f"{output} holds an earlier {config.option_kind} run (see its {config.file_name}); pass --overwrite to "
            f"replace it, or choose another --output (nothing was overwritten)."
        )
    changed = {}
    if saved is not None:
        changed = resume_changes(output, saved, config, fixed=fixed, ignored=ignored, resume_anyway=resume_anyway)
    checkpoint = resume_checkpoint(output, weights, resume=resume)
    if checkpoint is not None:
        logger.info("Resuming from %s: step %d of %d", checkpoint, checkpoint_step(checkpoint), config.max_steps)
    return RunFolder(checkpoint=checkpoint, saved=saved, changed=changed, replace=False)


def start_run_folder(output: Path, config: RecipeConfig, run: RunFolder, *, log: Path, **extra: Any) -> None:
    """The first write of a run, once every check passed: the earlier run's entries removed (`run.replace`;
    prepare_run_folder checked that the folder holds nothing else), the folder made, the resolved config written
    (with the step resumed from and the settings changed), and the log `log` started afresh unless resuming."""
    if run.replace and output.is_dir():
        for entry in output.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    output.mkdir(parents=True, exist_ok=True)
    config.save(output, **extra, **run.record())
    if run.checkpoint is None:
        log.unlink(missing_ok=True)


def _saved_value(config: RecipeConfig, name: str, value: Any) -> Any:
    """A saved setting read as this version reads it: an enum field's old name (e.g. method 'spt') as its member's
    value today."""
    current = getattr(config, name, None)
    if isinstance(current, enum.Enum):
        try:
            return type(current)(value).value
        except ValueError:
            return value
    return value


def resume_changes(
    output: Path,
    saved: dict[str, Any],
    config: RecipeConfig,
    *,
    fixed: Collection[str],
    ignored: Collection[str] = (),
    resume_anyway: bool = False,
) -> dict[str, list[Any]]:
    """The settings this resumed run changes against the run whose checkpoints it continues (`saved`, that run's
    config), as {field: [before, now]}. A change of a `fixed` field (what the checkpoint's tensors are shaped by,
    or what they are trained on) is an error; other changes are an error unless `resume_anyway`, and then each is
    logged. `ignored` fields, and those the saved config lacks (an older version), are not compared."""
    changes = {
        name: [saved[name], now]
        for name, now in config.to_dict().items()
        if name not in ("output", *ignored)
        and name in saved
        and _comparable(_saved_value(config, name, saved[name])) != _comparable(now)
    }
    blocking = [name for name in changes if name in fixed]
    if blocking:
        described = "; ".join(f"{name}={changes[name][0]!r} (this run: {changes[name][1]!r})" for name in blocking)
        again = " ".join(_flag(name, changes[name][0]) for name in blocking)
        raise ValueError(
            f"--resume: the checkpoints in {output} were trained with {described}; they cannot continue with other "
            f"values. Resume with {again}, or choose another --output (nothing was changed)."
        )
    described = "; ".join(f"{name} {before!r} -> {now!r}" for name, (before, now) in changes.items())
    if changes and not resume_anyway:
        raise ValueError(
            f"--resume: this run's settings differ from those of the run in {output} (its {config.file_name}): "
            f"{described}. Resume with the saved settings, or pass --resume-anyway (Python: resume_anyway=True) to "
            f"continue with the new ones (nothing was changed)."
        )
    for name, (before, now) in changes.items():
        logger.warning("--resume-anyway: %s changed from %r to %r", name, before, now)
    return changes


def _comparable(value: Any) -> Any:
    """A setting as compared on resume: a string that names an existing path as that path, resolved."""
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _flag(name: str, value: Any) -> str:
    text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"--{name.replace('_', '-')} {text}"
