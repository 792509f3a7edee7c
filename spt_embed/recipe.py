"""What every training recipe shares: a config dataclass filled from a YAML recipe and flag overrides, written
out resolved (with the library version) into the run's folder; enum parsing; the process rank; and the checkpoint
folder (the newest complete checkpoint, never running over another run's checkpoints)."""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import asdict, fields
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


def resume_checkpoint(output: Path, weights: str, *, resume: bool) -> Path | None:
    """The checkpoint a run into `output` continues from. With `resume`: the newest complete one, or None (with
    a warning) when there is none. Without: None, and checkpoints already in `output` are an error, so a run never
    silently restarts over another's checkpoints."""
    folder = Path(output) / CHECKPOINTS
    if not resume:
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} already holds checkpoints; pass --resume to continue that run, or choose another "
                f"--output (nothing was overwritten)."
            )
        return None
    checkpoint = latest_checkpoint(output, weights)
    if checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch.", folder)
    return checkpoint
