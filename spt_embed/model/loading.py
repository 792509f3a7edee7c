"""Build a SentenceTransformer from a saved folder without running any code the folder brings.

sentence-transformers imports whatever class each `modules.json` entry names and, with trust_remote_code=True,
imports it from Python files inside the folder; transformers likewise runs the code a `config.json`'s
``auto_map`` names. Here each type string is looked up in an exact table of classes this package imports itself
(`known_module_classes`), every module is built by its own `load` classmethod with trust_remote_code=False, and a
folder whose Hugging Face configs ask for their own code is refused. A folder is read as JSON and safetensors:
a Transformer or Dense module's weights only from its model.safetensors.

Running a folder's code stays possible, as the caller's explicit choice: `trust_remote_code=True` hands the folder
to sentence-transformers as it is.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from spt_embed.model.specs import MODULES_NAME

logger = logging.getLogger(__name__)

SETTINGS_NAME = "config_sentence_transformers.json"
# The Hugging Face configs through which transformers would import code from a folder (their `auto_map`).
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# The safetensors weights a Transformer (one file or shards) and a Dense module read; without them, transformers and
# sentence-transformers fall back to a pickled pytorch_model.bin.
TRANSFORMER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
DENSE_WEIGHTS = ("model.safetensors",)

Model = TypeVar("Model")


@functools.cache
def known_module_classes() -> Mapping[str, type]:
    """Every `modules.json` type string a folder saved by spt-embed, or a plain SentenceTransformer folder of the
    kinds spt-embed writes and reads (export, reference encoders), may name; each maps to a class imported here.

    sentence-transformers 6 writes `<module>.<class>`; releases up to 5.3 wrote `sentence_transformers.models.<class>`,
    and 5.4 to 5.x kept Normalize in `sentence_transformer.modules.normalize`. spt-embed 0.1 wrote `spt_embed.module`
    and `spt_embed.baselines`."""
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from spt_embed.model.baselines import BaselineModule
    from spt_embed.model.deep_suffix import DeepSuffixModule
    from spt_embed.model.module import SuffixPromptModule

    known: dict[str, type] = {
        "spt_embed.module.SuffixPromptModule": SuffixPromptModule,
        "spt_embed.baselines.BaselineModule": BaselineModule,
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize": Normalize,
    }
    for cls in (SuffixPromptModule, DeepSuffixModule, BaselineModule, Transformer, Pooling, Dense, Normalize):
        known[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for cls in (Transformer, Pooling, Dense, Normalize):
        known[f"sentence_transformers.models.{cls.__qualname__}"] = cls
    return known


@dataclass(frozen=True)
class ModuleEntry:
    """One entry of modules.json: the module's name, its subfolder and the type string naming its class."""

    index: int
    name: str
    path: str
    type: str
    kwargs: list  # the forward arguments sentence-transformers routes to it


def read_modules(folder: Path) -> list[ModuleEntry]:
    """The entries of `folder`/modules.json, checked for shape; subfolders stay inside `folder`."""
    modules_json = folder / MODULES_NAME
    if not modules_json.is_file():
        raise FileNotFoundError(
            f"{modules_json} is missing: {folder} is not a saved SentenceTransformer; save one with model.save(path) "
            f"or spt_embed.save()."
        )
    try:
        raw = json.loads(modules_json.read_text(encoding="utf-8"))
        if not isinstance(raw, list) or not raw:
            raise TypeError("expected a non-empty list of modules")
        entries = [
            ModuleEntry(index, str(item.get("name", index)), item["path"], item["type"], item.get("kwargs") or [])
            for index, item in enumerate(raw)
        ]
        if any(not isinstance(e.type, str) or not isinstance(e.path, str) for e in entries):
            raise TypeError("each module needs a string 'type' and 'path'")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{modules_json} is corrupted ({exc}); re-save the model.") from None
    for entry in entries:
        path = PurePosixPath(entry.path)
        if path.is_absolute() or ".." in path.parts or "\\" in entry.path:
            raise ValueError(
                f"{modules_json} entry {entry.index} has path {entry.path!r}, outside {folder}; a module's path is a "
                f"subfolder of the model folder."
            )
    return entries


def resolve_classes(entries: list[ModuleEntry], folder: Path) -> list[type]:
    """The class of each entry, from `known_module_classes` only; an unknown type string is an error naming it."""
    known = known_module_classes()
    for entry in entries:
        if entry.type not in known:
            names = sorted({cls.__qualname__ for cls in known.values()})
            raise ValueError(
                f"{folder / MODULES_NAME} entry {entry.index} names module type {entry.type!r}, which spt-embed does "
                f"not load: it builds only the module classes it knows ({', '.join(names)}, under the import paths "
                f"saved folders name) and never imports a class a folder names. If you trust the code that comes "
                f"with {folder}, load it with trust_remote_code=True."
            )
    return [known[entry.type] for entry in entries]


def refuse_remote_code(folder: Path) -> None:
    """A ValueError naming the file and its `auto_map` if a Hugging Face config in `folder` asks for its own code."""
    for name in CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}).") from None
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            raise ValueError(
                f"{path} has an auto_map ({json.dumps(auto_map)}), which asks transformers to run code from {folder}; "
                f"spt-embed never runs a model folder's code. Remove the auto_map to load the model with "
                f"transformers' own classes, or, if you trust that code, load it with trust_remote_code=True."
            )


def read_settings(folder: Path, model_class: type) -> dict[str, Any]:
    """The saved prompts and similarity function (config_sentence_transformers.json) as `model_class`'s
    constructor arguments."""
    path = folder / SETTINGS_NAME
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise TypeError("expected a JSON object")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is corrupted ({exc}); re-save the model.") from None
    model_type = model_class.model_type  # the archetype sentence-transformers records, "SentenceTransformer"
    saved_type = saved.get("model_type", model_type)
    if saved_type != model_type:
        raise ValueError(f"{folder} holds a {saved_type} (see {path}), not a {model_type}; it cannot encode here.")
    settings = {name: saved[name] for name in ("prompts", "default_prompt_name", "truncate_dim") if name in saved}
    # sentence-transformers ignores a similarity function it does not support; so does this.
    if saved.get("similarity_fn_name") in model_class.SUPPORTED_SIMILARITY_FN_NAMES:
        settings["similarity_fn_name"] = saved["similarity_fn_name"]
    return settings


def load_folder(
    folder: Path,
    model_class: type[Model],
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str | None = None,
    first: type | None = None,
    trust_remote_code: bool = False,
    backend: str = "torch",
) -> Model:
    """`model_class` (a SentenceTransformer) built from the modules `folder` saved, with nothing of the folder's
    code run; everything is checked before anything loads. `model_kwargs` go to every module's `load` (ours read
    `dtype`, `backbone`, `allow_backbone_mismatch`); `first`: the class the first module must be. `backend`: what
    sentence-transformers' Transformer module runs on ("onnx", "openvino": the model file an export wrote).

    With `trust_remote_code=True` sentence-transformers loads the folder as it is, code and all."""
    if trust_remote_code:
        logger.warning("Loading %s with trust_remote_code=True: code inside the folder may run.", folder)
        return model_class(
            str(folder),
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            model_kwargs=dict(model_kwargs or {}),
            device=device,
            backend=backend,
        )
    entries = read_modules(folder)
    classes = resolve_classes(entries, folder)
    if first is not None and not issubclass(classes[0], first):
        raise ValueError(
            f"{folder / MODULES_NAME} names {entries[0].type!r} as its first module, where a {first.__name__} "
            f"belongs; the folder is damaged: re-save it."
        )
    from sentence_transformers.base.modules import Dense, Transformer

    weights = {Transformer: TRANSFORMER_WEIGHTS, Dense: DENSE_WEIGHTS}
    for entry, cls in zip(entries, classes):
        refuse_remote_code(folder / entry.path)
        needed = weights.get(cls, ())
        if needed and not any((folder / entry.path / name).is_file() for name in needed):
            raise ValueError(
                f"{folder / entry.path} has no {needed[0]} for its {cls.__name__} module; spt-embed reads weights "
                f"from safetensors only, never from pickles. Re-save the model with a current sentence-transformers."
            )
    settings = read_settings(folder, model_class)
    # use_safetensors: transformers reads weights from safetensors only, never from a pickled pytorch_model.bin.
    # (The onnx and openvino backends read their own model file, and Optimum takes no such option.)
    options = {**({"use_safetensors": True} if backend == "torch" else {}), **(model_kwargs or {})}
    modules = OrderedDict(
        (
            entry.name,
            cls.load(
                str(folder),
                subfolder=entry.path,
                local_files_only=True,
                trust_remote_code=False,
                model_kwargs=dict(options),
                backend=backend,
            ),
        )
        for entry, cls in zip(entries, classes)
    )
    model = model_class(modules=modules, device=device, local_files_only=True, backend=backend, **settings)
    if any(entry.kwargs for entry in entries):
        model.module_kwargs = OrderedDict((entry.name, entry.kwargs) for entry in entries)
    return model
