"""What every training recipe shares: a config dataclass filled from a YAML recipe and flag overrides, written
out resolved (with the library version) into the run's folder; enum parsing; and the checkpoint folder."""

from __future__ import annotations

import enum
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from spt_embed.atomic import write_json

E = TypeVar("E", bound=enum.Enum)


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
