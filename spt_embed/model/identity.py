"""What identifies a model: digests that recognise the same weights again, and tell different ones apart.

Three digests, each with its own use (and each recorded in saved folders, so none may change its output):

- `fingerprint`: a backbone, in a saved adapter's spt_config.json: its architecture and a strided sample of every
  weight, so a multi-GB backbone is recognised in well under a second, at any dtype it is loaded in.
- `model_fingerprint`: an encoder, in an index folder's index_meta.json: its module types and prompts, plus for a
  suffix-prompt encoder its backbone's fingerprint and soft tokens, for any other model a sample of every weight.
- `folder_digest` / `file_sha256`: a model's files, in an eval results folder's spt_eval.json: every byte, with
  each file's hash remembered per (path, size, mtime) so that a large file is read once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from spt_embed.atomic import write_text

SAMPLE_VALUES = 512  # about this many values of each tensor go into a fingerprint
HASH_INDEX_NAME = "hash-index.json"

# The import paths by which saved folders' modules.json name spt_embed's own modules (spt_embed/module.py and
# spt_embed/baselines.py keep them importable). An encoder fingerprint hashes these rather than where the class is
# defined, so an index stays valid for the model that built it.
SAVED_TYPE_NAMES = {
    "spt_embed.model.module.SuffixPromptModule": "spt_embed.module.SuffixPromptModule",
    "spt_embed.model.baselines.BaselineModule": "spt_embed.baselines.BaselineModule",
}


def hash_weight_sample(digest, tensors: Mapping[str, torch.Tensor], *, with_shapes: bool = False) -> None:
    """Feed `digest` every tensor's name (with its shape if `with_shapes`) and a strided sample of its values (fp32)."""
    with torch.no_grad():
        for name, tensor in sorted(tensors.items()):
            flat = tensor.detach().reshape(-1)
            digest.update((f"{name}:{tuple(tensor.shape)}" if with_shapes else name).encode())
            digest.update(flat[:: max(1, flat.numel() // SAMPLE_VALUES)].to(torch.float32).cpu().numpy().tobytes())


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a strided sample of every weight (fp32), stable across save/load."""
    digest = hashlib.sha256()
    config = model.config
    essentials = {
        key: getattr(config, key, None)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    }
    digest.update(json.dumps(essentials, sort_keys=True).encode())
    hash_weight_sample(digest, model.state_dict())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> tuple[str, str]:
    """(fingerprint, backbone fingerprint) of a SentenceTransformer; the backbone part is "" for non-SPT models.

    A suffix-prompt encoder is identified by its backbone's fingerprint, the soft prompt (hashed in full) and how
    it is applied; any other model by a strided sample of every weight. Both include the module types and the
    model's prompts, which change its embeddings as much as its weights do.
    """
    from spt_embed.model.module import SuffixPromptModule

    digest = hashlib.sha256()
    types = [f"{type(module).__module__}.{type(module).__qualname__}" for module in model]
    types = [SAVED_TYPE_NAMES.get(name, name) for name in types]
    prompts = {name: text for name, text in (getattr(model, "prompts", None) or {}).items() if text}  # "" = none
    digest.update(json.dumps({"modules": types, "prompts": prompts}, sort_keys=True).encode())
    first = model[0]
    if isinstance(first, SuffixPromptModule):
        backbone = first.backbone_ref.fingerprint
        setup = {"backbone": backbone, "placement": first.spt_config.placement.value, "causal": first.is_causal}
        # What later options add is hashed only when set, so a plain suffix keeps the fingerprint 0.1 gave it.
        if first.readout.value != "last":
            setup["readout"] = first.readout.value
        if first.spt_config.method.value != "suffix":
            setup["method"] = first.spt_config.method.value
        if first.spt_config.deep_offsets.value != "states":  # where a deep suffix's offsets act
            setup["deep_offsets"] = first.spt_config.deep_offsets.value
        if first.spt_config.tasks:  # task soft prompts: which tensor is which task's
            setup["tasks"] = first.spt_config.tasks
        if first.spt_config.tail:  # text after every text
            setup["tail"] = first.spt_config.tail
        if first.spt_config.task_max_length:  # a shorter or longer cut changes the embeddings
            setup["task_max_length"] = first.spt_config.task_max_length
        digest.update(json.dumps(setup, sort_keys=True).encode())
        for key, tensor in sorted(first.adapter_tensors().items(), key=lambda item: item[0] != "soft_prompt"):
            digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())  # the soft prompt first
        return digest.hexdigest()[:16], backbone
    backend_digest = getattr(model, "spt_backend_digest", None)
    if backend_digest:  # an onnx / openvino model file (spt_embed.model.export.open_exported), hashed when opened
        digest.update(backend_digest.encode())
    else:
        hash_weight_sample(digest, model.state_dict(), with_shapes=True)
    return digest.hexdigest()[:16], ""


def files_digest(files: list[Path], chunk: int = 2**20) -> str:
    """sha256 of each file's name and bytes (an exported model file and its weights: hundreds of MB, about 1 s)."""
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                while block := handle.read(chunk):
                    digest.update(block)
    return digest.hexdigest()


def prompt_routes(model) -> dict[str, str]:
    """The soft prompt that queries (`encode_query`) and documents (`encode_document`) go through, for a
    suffix-prompt encoder with task prompts: {'query': ..., 'document': ...}, 'default' for a side without a prompt
    of its own. Empty for every other model (one prompt, or none), so indexes written before task prompts existed
    compare equal."""
    from spt_embed.model.module import SuffixPromptModule

    first = model[0]
    if not isinstance(first, SuffixPromptModule) or not first.task_names:
        return {}
    return {side: side if side in first.task_names else "default" for side in ("query", "document")}


def file_sha256(path: Path) -> str:
    """Content hash of a file, remembered per (path, size, mtime) so a multi-GB GGUF is hashed once."""
    from spt_embed.model.backbone import cache_dir

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir() / HASH_INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    write_text(index_path, json.dumps(index, indent=1))
    return index[key]


def folder_digest(folder: Path) -> str:
    """sha256 over every file's path (relative to `folder`) and content hash; bytecode caches left out."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
