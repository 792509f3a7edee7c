"""User-facing constructors: a suffix-prompt encoder is a SentenceTransformer whose first module is ours."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize

from spt_embed.model.config import AdapterMethod, DeepOffsets, Init, Placement, Readout
from spt_embed.model.dtypes import resolve_dtype
from spt_embed.model.loading import load_folder
from spt_embed.model.module import SuffixPromptModule
from spt_embed.model.specs import classify


class SuffixPromptEncoder(SentenceTransformer):
    """A SentenceTransformer made of a `SuffixPromptModule` (and a `Normalize` by default)."""

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike,
        *,
        num_tokens: int = 16,
        init: Init | str = Init.TEXT,
        init_text: str | None = None,
        placement: Placement | str = Placement.SUFFIX,
        tail: str | None = None,
        max_length: int = 512,
        readout: Readout | str = Readout.LAST,
        prompt: str | None = None,
        method: AdapterMethod | str = AdapterMethod.SUFFIX,
        deep_offsets: DeepOffsets | str | None = None,
        tasks: list[str] | None = None,
        task_max_length: dict[str, int] | None = None,
        normalize: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
    ) -> SuffixPromptEncoder:
        """A fresh (untrained) encoder on a frozen backbone: a registered name, a model directory or a GGUF file.

        `prompt`: a hard text template put before every text (e.g. 'This sentence : "'), the soft tokens following
        the text; it becomes the encoder's default sentence-transformers prompt (see `template_prompts`).
        `tail`: hard text after every text, kept whole when a text is cut (e.g. PromptEOL's '" means in one word:"'
        with placement='prefix', so that the last position read is the template's, not the cut text's).
        `method`: suffix (the soft tokens alone) or deep-suffix (plus per-layer offsets at the soft positions).
        `deep_offsets` (deep-suffix): where those offsets act: 'states' (each layer's output, the default) or 'kv'
        (the keys and values of each layer's attention, the P-tuning v2 form).
        `tasks`: soft prompts of their own for these tasks, e.g. ['query', 'document'] (`encode_query` /
        `encode_document`; `encode` keeps the default prompt); `task_max_length`: a maximum length per task."""
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise ValueError(f"prompt must be a non-empty string or None, got {prompt!r}.")
        module = SuffixPromptModule.from_backbone(
            backbone,
            num_tokens=num_tokens,
            init=init,
            init_text=init_text,
            placement=placement,
            tail=tail,
            max_length=max_length,
            readout=readout,
            method=method,
            deep_offsets=deep_offsets,
            tasks=tasks,
            task_max_length=task_max_length,
            seed=seed,
            dtype=dtype,
        )
        modules: list[torch.nn.Module] = [module, Normalize()] if normalize else [module]
        if prompt is None:
            return cls(modules=modules, device=device)
        return cls(modules=modules, device=device, prompts=template_prompts(prompt), default_prompt_name=DEFAULT_PROMPT)

    @property
    def prompt_module(self) -> SuffixPromptModule:
        return self[0]


DEFAULT_PROMPT = "default"  # the name of an encoder's text template among its sentence-transformers prompts


def template_prompts(template: str) -> dict[str, str]:
    """The sentence-transformers prompts of an encoder whose every text goes inside `template`: the default prompt
    (`encode`), and the same text as its `query` and `document` prompts, which `encode_query` / `encode_document`
    (mteb's retrieval, `spt-embed index`) pick instead of the default and which are otherwise empty."""
    return {DEFAULT_PROMPT: template, "query": template, "document": template}


def default_prompt(model: SentenceTransformer) -> str | None:
    """The prompt `model.encode` applies when it is given none (its `default_prompt_name`'s), or None."""
    name = model.default_prompt_name
    return (model.prompts.get(name) or None) if name else None


def compose_prompt(model: SentenceTransformer, prompt: str | None) -> str | None:
    """An explicit `prompt` (an instruction, a query prompt) for `model.encode*`, placed after the model's default
    prompt: sentence-transformers replaces the default prompt by an explicit one, which would drop an encoder's
    text template. The instruction goes inside the template, before the text, as the PromptEOL baseline's does.
    None stays None: the model then applies its own prompts."""
    if prompt is None:
        return None
    return (default_prompt(model) or "") + prompt


def resolve_adapter_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled adapter name or a local adapter folder; a clear error for anything else."""
    return classify(name_or_path).adapter_folder()


def load(
    name_or_path: str | os.PathLike,
    *,
    backbone: str | os.PathLike | None = None,
    allow_backbone_mismatch: bool = False,
    dtype: str | torch.dtype = torch.float32,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> SuffixPromptEncoder:
    """Load a saved adapter (or a bundled one by name) as a SentenceTransformer; no code from the folder runs.
    A folder trained with method=prefix or lora (a baseline with its peft adapter) loads too, as a plain
    SentenceTransformer whose first module is a BaselineModule; a LoRA adapter stays a peft adapter, as trained
    and saved (`model[0].merge_lora()` folds it into the weights for faster encoding, as `open_encoder` does).

    `backbone` overrides where the frozen backbone is loaded from (the fingerprint is still checked unless
    `allow_backbone_mismatch`). Only the module classes spt-embed knows are built (model/loading.py);
    `trust_remote_code=True` is the caller's choice to let sentence-transformers import whatever the folder names.
    """
    model_kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "allow_backbone_mismatch": allow_backbone_mismatch}
    if backbone is not None:
        model_kwargs["backbone"] = str(backbone)
    if is_baseline_folder(name_or_path):  # method=prefix or lora: a peft adapter on a PromptEOL baseline
        from spt_embed.model.baselines import BaselineModule

        return load_folder(
            Path(name_or_path).expanduser(),
            SentenceTransformer,
            model_kwargs=model_kwargs,
            device=device,
            first=BaselineModule,
            trust_remote_code=trust_remote_code,
        )
    path = resolve_adapter_path(name_or_path)
    return load_folder(
        path,
        SuffixPromptEncoder,
        model_kwargs=model_kwargs,
        device=device,
        first=SuffixPromptModule,
        trust_remote_code=trust_remote_code,
    )


def is_baseline_folder(name_or_path: str | os.PathLike) -> bool:
    """Whether a path is a saved baseline (zero-shot, LoRA or prefix: baseline_config.json beside modules.json)."""
    from spt_embed.model.baselines import BASELINE_CONFIG_NAME
    from spt_embed.model.specs import MODULES_NAME

    folder = Path(name_or_path).expanduser()
    return (folder / BASELINE_CONFIG_NAME).is_file() and (folder / MODULES_NAME).is_file()


def save(model: SentenceTransformer, path: str | os.PathLike, *, include_backbone: bool = False) -> None:
    """Save an encoder: adapter only by default (a few KB), or with the backbone for a self-contained folder."""
    module = model[0]
    if not isinstance(module, SuffixPromptModule):
        raise TypeError(f"Expected a suffix-prompt encoder, got a model whose first module is {type(module).__name__}.")
    model.save(str(path))
    if include_backbone:
        # sentence-transformers hands its modules no options when saving, so the prompt module, which lives in
        # the folder's root, writes itself again, backbone included.
        module.save(str(path), include_backbone=True)


def open_encoder(
    spec: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    backend: str = "torch",
    merge_lora: bool = True,
) -> SentenceTransformer:
    """Any encoder a command accepts: a spt-embed adapter (folder or bundled name), a SentenceTransformer folder
    or a reference encoder, with its weights in `dtype`. No code from the folder runs unless `trust_remote_code`.

    For encoding only: a LoRA baseline's adapter is merged into its backbone in memory (`merge_lora`; fp32, before
    the cast to `dtype`; nothing is written), so that it runs as a plain decoder, as fast as a merged folder and
    with the same embeddings. `spt_embed.load` keeps the adapter as it was saved.

    `backend` "onnx" or "openvino": the model file that `spt-embed export --backend ...` wrote into an exported
    folder, run by sentence-transformers' own backend on the CPU (spt_embed.model.export.open_exported)."""
    if backend != "torch":
        from spt_embed.model.export import open_exported

        return open_exported(spec, backend, dtype=dtype, device=device)
    dtype = resolve_dtype(dtype)
    kind, folder = classify(spec).encoder_folder(
        backbone_advice=f"train a suffix prompt on it (`spt-embed train`) or build an untrained one with "
        f"SuffixPromptEncoder.from_backbone({str(spec)!r})."
    )
    if kind == "adapter":
        return load(folder, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    # A SentenceTransformer folder: a plain or exported one, a reference encoder, a saved LoRA baseline.
    model = load_folder(folder, SentenceTransformer, device=device, trust_remote_code=trust_remote_code)
    if merge_lora:
        from spt_embed.model.lora import merge_lora_for_inference

        model = merge_lora_for_inference(model)
    return model if dtype == torch.float32 else model.to(dtype)
