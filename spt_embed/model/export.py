"""Export an adapter to a plain SentenceTransformer folder that loads with no custom code.

The K soft tokens become K added special tokens whose input-embedding rows hold the trained vectors; the
tokenizer's post-processor appends them to every text (after truncation, which leaves room for them); pooling is
sentence-transformers' own last-token pooling. That covers the `last` readout only: the `soft-mean` and `layer-mix`
readouts need the adapter's own module (`spt_embed.load`). An encoder's text template (its default prompt) goes
into the export's sentence-transformers prompts. Of the training methods (`spt-embed train --method`) only suffix
exports: deep-suffix, prompt, prefix and lora, like task prompts, a text tail and the other readouts, are refused
before anything is written, with the method named and what to use instead.

Every export holds `spt_export.json` (the spt-embed version, the adapter exported, the soft tokens' names): the
mark by which `overwrite=True` recognises a folder it may replace. Any other non-empty folder, and any output that
is, contains or lies inside the adapter's own folder, is refused before anything is written.

`backend="onnx"` / `"openvino"` add, beside the PyTorch weights, the files that sentence-transformers'
`SentenceTransformer(out, backend="onnx" | "openvino")` loads (`onnx/model.onnx`, `openvino/openvino_model.xml`),
made by sentence-transformers' own exporters (through Optimum): nothing here converts a model itself.
`quantize="int8"` makes that default file int8: ONNX Runtime dynamic quantisation (weights int8, activations
quantised on the fly; the preset for this machine's CPU), or OpenVINO static post-training quantisation through
NNCF (weights and activations, calibrated on `calibration_texts`, by default 300 STS-B train sentences). After
writing, the backend model encodes a few probe texts and is compared with the PyTorch export; the cosine is recorded
in `spt_export.json`, and an unquantised backend model below 0.999 is an error.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import math
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers.processors import TemplateProcessing

from spt_embed._version import __version__
from spt_embed.atomic import atomic_folder, write_json
from spt_embed.hardware import cpu_flags
from spt_embed.model.config import AdapterMethod, Placement, Readout
from spt_embed.model.encoder import is_baseline_folder, load, resolve_adapter_path
from spt_embed.model.module import SuffixPromptModule

logger = logging.getLogger(__name__)

EXPORT_MARKER = "spt_export.json"


class ExportBackend(str, enum.Enum):
    """The runtime an export is made for; each also loads with `SentenceTransformer(out, backend=value)`."""

    TORCH = "torch"
    ONNX = "onnx"
    OPENVINO = "openvino"


QUANTIZE_CHOICES = ("int8",)
# What sentence-transformers' loaders and exporters import for each backend: (module, name in it or None). Optimum
# imports lazily, so a package built for other transformers versions fails only when the name itself is imported.
BACKEND_MODULES = {
    ExportBackend.ONNX: (
        ("onnxruntime", None),
        ("optimum.onnxruntime", "ORTModelForFeatureExtraction"),
        ("optimum.onnxruntime", "ORTQuantizer"),
        ("optimum.exporters.onnx", "main_export"),
    ),
    ExportBackend.OPENVINO: (
        ("openvino", None),
        ("nncf", None),
        ("optimum.intel.openvino", "OVModelForFeatureExtraction"),
        ("optimum.intel.openvino", "OVQuantizer"),
        ("optimum.exporters.openvino", "main_export"),
    ),
}
BACKEND_EXTRAS = {ExportBackend.ONNX: "onnx", ExportBackend.OPENVINO: "openvino"}
BACKEND_NAMES = {ExportBackend.ONNX: "ONNX Runtime and Optimum", ExportBackend.OPENVINO: "OpenVINO, NNCF and Optimum Intel"}
# Where sentence-transformers looks for each backend's model file by default.
BACKEND_FILES = {ExportBackend.ONNX: "onnx/model.onnx", ExportBackend.OPENVINO: "openvino/openvino_model.xml"}
CALIBRATION_SAMPLES = 300  # sentence-transformers' default for OpenVINO static quantisation
FP32_MIN_COSINE = 0.999
PROBE_TEXTS = (
    "A man is playing a flute.",
    "The dog runs quickly in the park.",
    "hello",
    "A small red cat sleeps on the roof of the big blue house while the child eats.",
)


def parse_backend(backend: str | ExportBackend, quantize: str | None) -> ExportBackend:
    """The backend as an ExportBackend, after checking that it and `quantize` are known and go together."""
    try:
        backend = ExportBackend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in ExportBackend)
        raise ValueError(f"Unknown export backend {backend!r}; choose one of {choices} (nothing was written).") from None
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(
            f"Unknown quantize option {quantize!r}; the one offered is {', '.join(QUANTIZE_CHOICES)} (with backend "
            f"'onnx' or 'openvino'), or none for float32 (nothing was written)."
        )
    if quantize is not None and backend is ExportBackend.TORCH:
        raise ValueError(
            f"quantize={quantize!r} needs backend 'onnx' or 'openvino': the PyTorch export keeps the adapter's weights "
            f"as they are. Pass backend='onnx' or 'openvino' (CLI: --backend onnx), or drop quantize and encode "
            f"the PyTorch export in bfloat16 (nothing was written)."
        )
    return backend


def backend_problem(backend: ExportBackend) -> str | None:
    """Why the backend's packages cannot be used here (not installed, or failing to import), or None if they can."""
    for name, attribute in BACKEND_MODULES.get(backend, ()):
        try:
            module = importlib.import_module(name)
            if attribute is not None:
                getattr(module, attribute)
        except Exception as exc:  # a package built for other library versions can fail with more than ImportError
            missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and name.startswith(exc.name)
            where = name if attribute is None else f"{name}.{attribute}"
            return f"{name} is not installed" if missing else f"{where} fails to import ({type(exc).__name__}: {exc})"
    return None


def require_backend(backend: ExportBackend) -> None:
    """An ImportError naming the pip extra when the backend's packages cannot be used."""
    problem = backend_problem(backend)
    if problem is not None:
        raise ImportError(
            f"backend={backend.value!r} needs {BACKEND_NAMES[backend]}, which sentence-transformers runs it through, "
            f"but {problem}. Install them with: pip install 'spt-embed[{BACKEND_EXTRAS[backend]}]' (nothing was "
            f"written)."
        )


def onnx_int8_preset() -> str:
    """sentence-transformers' name of the ONNX Runtime dynamic int8 preset for this machine's CPU."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags()  # empty where unknown (not Linux): then the preset every x86-64 CPU of the last decade runs
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"  # 7-bit weights (reduce_range): no overflow on CPUs without VNNI


def soft_token_names(num_tokens: int, vocab: dict[str, int]) -> list[str]:
    """Names for the added tokens that collide with nothing in the vocabulary."""
    stem = "<|spt_{}|>"
    while any(stem.format(i) in vocab for i in range(num_tokens)):
        stem = "<|" + stem[2:-2] + "_|>"
    return [stem.format(i) for i in range(num_tokens)]


def _special_tokens_around_text(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text (e.g. BOS), found by tokenising with and without them."""
    probe = "spt probe text"
    with_special = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start], with_special[start + len(bare) :]
    raise ValueError("Cannot locate the text inside the tokenizer's special-token template; export unsupported.")


def open_exported(
    spec: str | os.PathLike, backend: str | ExportBackend, *, dtype: str | torch.dtype = "float32",
    device: str | None = None,
) -> SentenceTransformer:
    """A SentenceTransformer folder run on the model file that `spt-embed export --backend onnx|openvino` wrote into
    it, through sentence-transformers' own `backend=...`, checked as every folder is (spt_embed.model.loading). Its
    fingerprint covers that file (`spt_backend_digest`, read once here; spt_embed.model.identity.model_fingerprint),
    so an index built with it is searched with the same file. The runtime chooses its own precision: `dtype` must be
    float32 (or auto); OpenVINO itself computes in bfloat16 on CPUs with AMX or AVX512-BF16."""
    from spt_embed.model.dtypes import resolve_dtype
    from spt_embed.model.identity import files_digest
    from spt_embed.model.loading import load_folder
    from spt_embed.model.specs import classify

    try:
        backend = ExportBackend(backend)
    except ValueError:
        raise ValueError(
            f"Unknown backend {backend!r}; choose one of {', '.join(b.value for b in ExportBackend)}."
        ) from None
    if backend is ExportBackend.TORCH:
        raise ValueError("open_exported runs an onnx or openvino model file; open PyTorch models with open_encoder.")
    if dtype != "auto" and resolve_dtype(dtype) != torch.float32:
        raise ValueError(
            f"dtype {dtype!r} sets PyTorch weights; backend {backend.value!r} runs its exported file at the "
            f"runtime's own precision (a smaller one comes from `spt-embed export --quantize int8`). Drop --dtype."
        )
    if device not in (None, "cpu"):
        raise ValueError(f"backend {backend.value!r} runs on the CPU here; for device {device!r} use backend torch.")
    kind, folder = classify(spec).encoder_folder(
        backbone_advice=f"train a suffix prompt on it, export it with `spt-embed export ADAPTER OUT --backend "
        f"{backend.value}`, and pass OUT."
    )
    if kind == "adapter":
        raise ValueError(
            f"{spec} is a spt-embed adapter; backend {backend.value!r} runs an exported model file. Export it "
            f"first: `spt-embed export {spec} OUT --backend {backend.value}` (Python: spt_embed.export(..., "
            f"backend={backend.value!r})), then pass OUT."
        )
    file = folder / BACKEND_FILES[backend]
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder} has no {BACKEND_FILES[backend]}, the file backend {backend.value!r} runs. Export the adapter "
            f"with `spt-embed export ADAPTER {folder} --backend {backend.value} --overwrite`, or open it with "
            f"backend torch."
        )
    require_backend(backend)
    model = load_folder(folder, SentenceTransformer, device="cpu", backend=backend.value)
    model.spt_backend_digest = files_digest(sorted(file.parent.iterdir()))
    return model


def export(
    adapter: str | os.PathLike | SentenceTransformer,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    backend: str | ExportBackend = ExportBackend.TORCH,
    quantize: str | None = None,
    calibration_texts: Sequence[str] | None = None,
) -> Path:
    """Write a self-contained plain SentenceTransformer folder equivalent to the adapter; returns its path.

    `output` must be new, empty, or (with `overwrite`) an earlier export; never the adapter's folder, inside it, or
    around it. `backend` "onnx" or "openvino" adds that runtime's model files (needs the extra of that name), which
    `SentenceTransformer(output, backend=backend)` loads; `quantize="int8"` makes them int8. `calibration_texts`:
    the texts OpenVINO's static int8 quantisation calibrates on (default: 300 STS-B train sentences)."""
    backend = parse_backend(backend, quantize)
    if calibration_texts is not None and not (backend is ExportBackend.OPENVINO and quantize):
        raise ValueError(
            "calibration_texts (CLI: --calibration) is used by backend='openvino' with quantize='int8' only; drop it "
            "or pass those (nothing was written)."
        )
    if backend is not ExportBackend.TORCH:
        require_backend(backend)
    calibration = _calibration_texts(calibration_texts) if backend is ExportBackend.OPENVINO and quantize else None
    out = Path(output).expanduser()
    if isinstance(adapter, SentenceTransformer):
        source = None
    elif is_baseline_folder(adapter):  # method=prefix or lora: refused below, with the reason
        source = Path(adapter).expanduser().resolve()
    else:
        source = resolve_adapter_path(adapter).resolve()
    _check_output(source, out, overwrite=overwrite)
    model = adapter if isinstance(adapter, SentenceTransformer) else load(adapter)
    module = model[0]
    _refuse_baseline(module)
    if not isinstance(module, SuffixPromptModule):
        raise TypeError(
            f"Expected a suffix-prompt encoder, got first module {type(module).__name__}: export writes a suffix "
            f"adapter's soft tokens into a plain SentenceTransformer. Load this folder with spt_embed.load(...)."
        )
    if module.spt_config.method is not AdapterMethod.SUFFIX:
        raise ValueError(
            f"Method {module.spt_config.method.value!r} cannot be exported as a plain SentenceTransformer: its "
            f"per-layer offsets at the soft positions have no place in a plain decoder (export writes the soft "
            f"tokens as vocabulary rows, nothing else). Use the adapter itself: spt_embed.load(...) (or "
            f"SentenceTransformer(adapter, trust_remote_code=True)) gives the same encoder (nothing was written)."
        )
    if module.task_names:
        raise ValueError(
            f"An adapter with task soft prompts ({', '.join(module.task_names)}, beside the default one) cannot be "
            f"exported as a plain SentenceTransformer: export writes one set of soft tokens as vocabulary rows "
            f"after every text, and sentence-transformers' prompts and Router can only put text before it or route "
            f"to whole copies of the backbone. Use the adapter itself: spt_embed.load(...) (or "
            f"SentenceTransformer(adapter, trust_remote_code=True)) routes encode_query / encode_document to their "
            f"prompts (nothing was written)."
        )
    if module.spt_config.task_max_length:
        logger.warning(
            "The export has one maximum length (%d tokens) for every text; the adapter's per-task lengths %s are "
            "not kept.", module.max_seq_length, module.spt_config.task_max_length
        )
    if module.spt_config.placement is not Placement.SUFFIX:
        # What `spt-embed train --method prompt` trains (and --method suffix --placement prefix).
        raise ValueError(
            f"Method 'prompt' (soft tokens before the text: placement={module.spt_config.placement.value!r}) cannot "
            f"be exported as a plain SentenceTransformer: export writes the soft tokens as vocabulary rows after "
            f"every text, the only placement it converts. Use the adapter itself: spt_embed.load(...) (or "
            f"SentenceTransformer(adapter, trust_remote_code=True)) gives the same encoder (nothing was written)."
        )
    if module.spt_config.tail:
        raise ValueError(
            f"The text tail {module.spt_config.tail!r} cannot be exported as a plain SentenceTransformer: its "
            f"tokenizer would cut it off long texts, and its prompts only put text before a text. Use the adapter "
            f"itself: spt_embed.load(...) (or SentenceTransformer(adapter, trust_remote_code=True)) gives the same "
            f"encoder (nothing was written)."
        )
    if module.readout is not Readout.LAST:
        raise ValueError(
            f"Readout {module.readout.value!r} cannot be exported as a plain SentenceTransformer: its pooling "
            f"(last-token pooling of the final layer) reads only the 'last' readout. Use the adapter itself: "
            f"spt_embed.load(...) (or SentenceTransformer(adapter, trust_remote_code=True)) gives the same encoder "
            f"(nothing was written)."
        )

    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder is free to take; atomic_folder replaces only a folder of its own kind

    def write(folder: Path) -> None:
        record = _write_plain(model, folder, source)
        if backend is not ExportBackend.TORCH:
            record.update(_write_backend(folder, backend, quantize, calibration))
            write_json(folder / EXPORT_MARKER, record)

    atomic_folder(out, write, overwrite=overwrite, marker=EXPORT_MARKER)
    logger.info(
        "Exported %s to %s (plain SentenceTransformer, %d soft tokens; backend %s%s)",
        adapter, out, module.num_tokens, backend.value, f", {quantize}" if quantize else "",
    )
    return out


def _refuse_baseline(module) -> None:
    """The refusal, naming the method and what to use instead, of a baseline module (what `spt-embed train
    --method prefix` and `--method lora` save, and the zero-shot baselines): export converts soft tokens only."""
    from spt_embed.model.baselines import Baseline, BaselineModule

    if not isinstance(module, BaselineModule):
        return
    kind = module.peft_kind
    use = (
        "Use the folder itself: spt_embed.load(...) (or SentenceTransformer(folder, trust_remote_code=True)) gives "
        "the same encoder"
    )
    if kind == "prefix":
        raise ValueError(
            f"Method 'prefix' cannot be exported as a plain SentenceTransformer: its trained keys/values at every "
            f"layer have no place in a plain decoder. {use} (nothing was written)."
        )
    if kind == "lora" or module.trained_from is not None:  # LoRA on the backbone, as trained or merged into it
        reading = (
            f"reads each text inside its PromptEOL template {module.baseline.template!r} at the template's last "
            f"token, and a plain SentenceTransformer's prompts only put text before a text"
            if module.baseline is Baseline.PROMPTEOL
            else "is a fine-tuned backbone, not soft tokens"
        )
        merged = (
            "; its backbone/ subfolder already is the merged decoder as a plain transformers model (with its "
            "tokenizer: transformers.AutoModel.from_pretrained(folder/'backbone')), for use under that template "
            "with last-token pooling"
            if kind is None
            else "; for the decoder with the LoRA merged into its weights as a plain transformers model, run "
            "`spt-embed merge-lora FOLDER OUT`: OUT/backbone/ is that decoder, with its tokenizer"
        )
        raise ValueError(
            f"Method 'lora' cannot be exported as a plain SentenceTransformer: export writes a suffix adapter's "
            f"soft tokens as vocabulary rows, and the LoRA baseline has none: it {reading}. {use}{merged} (nothing "
            f"was written)."
        )
    raise ValueError(
        f"The zero-shot {module.baseline.value!r} baseline of {module.backbone_ref.source!r} cannot be exported: "
        f"it has no trained soft tokens, which are what export writes. {use}; or use the backbone itself "
        f"(nothing was written)."
    )


def _calibration_texts(texts: Sequence[str] | None) -> list[str]:
    """The texts OpenVINO's static quantisation calibrates on: those given, or the first STS-B train sentences."""
    if texts is None:
        from spt_embed.datafiles import load_sts

        try:
            first, _, _ = load_sts("train")
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"OpenVINO int8 calibrates on STS-B train sentences by default, which are not available here ({exc}). "
                f"Pass calibration_texts (CLI: --calibration FILE) with a few hundred texts like those you will encode."
            ) from None
        texts = first[:CALIBRATION_SAMPLES]
    texts = [str(text) for text in texts if str(text).strip()]
    if not texts:
        raise ValueError("calibration_texts holds no non-empty text; pass a few hundred texts like those you will encode.")
    return texts[:CALIBRATION_SAMPLES]


def _check_output(source: Path | None, out: Path, *, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an output that would replace the adapter folder `source` (the
    same folder, resolved through symlinks, one inside it, or one around it) or a folder that is not an earlier
    export."""
    if source is not None:
        target = out.resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else "is inside" if source in target.parents else "contains"
            raise ValueError(
                f"The output folder {out} {relation} the adapter folder {source}: exporting there would replace the "
                f"adapter. Choose an output folder outside it (nothing was written)."
            )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass a new or empty folder as the export's output.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace an earlier export."
            )
        if not (out / EXPORT_MARKER).is_file():
            raise FileExistsError(
                f"{out} is not an earlier export (it has no {EXPORT_MARKER}, which every export writes), and "
                f"--overwrite replaces only those. Choose a new or empty folder (nothing was changed)."
            )


def _write_plain(model: SentenceTransformer, folder: Path, source: Path | None) -> dict:
    """Fill `folder` with the plain SentenceTransformer and its `spt_export.json` (`source`: the adapter's folder,
    None for a model passed in memory), and return that record. It is built from a reloaded copy of the backbone, so
    the encoder in memory stays untouched."""
    from transformers import AutoModel, AutoTokenizer

    from spt_embed.model.backbone import ensure_pad_token

    module = model[0]
    backbone_dir = folder / "_backbone"
    module.backbone.save_pretrained(backbone_dir)
    module.tokenizer.save_pretrained(backbone_dir)
    backbone = AutoModel.from_pretrained(
        backbone_dir, dtype=next(module.backbone.parameters()).dtype, trust_remote_code=False, use_safetensors=True
    )
    tok = AutoTokenizer.from_pretrained(backbone_dir, trust_remote_code=False)
    ensure_pad_token(tok, backbone_dir)
    before, after = _special_tokens_around_text(tok)
    names = soft_token_names(module.num_tokens, tok.get_vocab())
    tok.add_tokens(names, special_tokens=True)
    ids = tok.convert_tokens_to_ids(names)
    backbone.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        backbone.get_input_embeddings().weight[ids] = module.soft_prompt.detach().to(backbone.dtype)
    template = [tok.convert_ids_to_tokens(i) for i in before] + ["$A"]
    template += [tok.convert_ids_to_tokens(i) for i in after] + names
    specials = {tok.convert_ids_to_tokens(i): i for i in [*before, *after, *ids]}
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=" ".join(template), special_tokens=list(specials.items())
    )
    # Without this, sentence-transformers wraps every input in the chat template.
    tok.chat_template = None
    tok.model_max_length = module.max_seq_length
    backbone.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.rmtree(backbone_dir)

    transformer = Transformer(str(folder), max_seq_length=module.max_seq_length)
    pooling = Pooling(module.get_embedding_dimension(), pooling_mode="lasttoken")
    modules = [transformer, pooling] + [m for m in list(model)[1:] if isinstance(m, Normalize)]
    plain = SentenceTransformer(
        modules=modules, device="cpu", prompts=model.prompts or None, default_prompt_name=model.default_prompt_name
    )
    plain.save(str(folder))
    record = {"spt_embed_version": __version__, "adapter": str(source) if source else None, "soft_tokens": names}
    write_json(folder / EXPORT_MARKER, record)
    return record


def _write_backend(folder: Path, backend: ExportBackend, quantize: str | None, calibration: list[str] | None) -> dict:
    """Add the backend's default model file to the plain export in `folder` with sentence-transformers' exporters,
    check it against the PyTorch export on the probe texts, and return what the export record notes about it."""
    expected = SentenceTransformer(str(folder), device="cpu").encode(list(PROBE_TEXTS), convert_to_tensor=True)
    if backend is ExportBackend.ONNX:
        quantization = _write_onnx(folder, quantize)
    else:
        quantization = _write_openvino(folder, quantize, calibration)
    loaded = SentenceTransformer(str(folder), backend=backend.value, device="cpu")
    got = loaded.encode(list(PROBE_TEXTS), convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(got.float().cpu(), expected.float().cpu(), dim=-1).min().item()
    logger.info("%s export: min cosine %.6f to the PyTorch export on %d probe texts", backend.value, cosine, len(got))
    if math.isnan(cosine):  # some probe text's embedding is NaN
        raise ValueError(
            f"The {backend.value} model returns NaN embeddings on the probe texts: the conversion is wrong for this "
            f"backbone. Use backend='torch' (nothing was written)."
        )
    if quantize is None and cosine < FP32_MIN_COSINE:
        raise ValueError(
            f"The {backend.value} model disagrees with the PyTorch export (min cosine {cosine:.6f} < {FP32_MIN_COSINE} "
            f"on {len(got)} probe texts): the conversion is wrong for this backbone. Use backend='torch' (nothing was "
            f"written)."
        )
    return {
        "backend": backend.value,
        "backend_file": BACKEND_FILES[backend],
        "quantization": quantization,
        "probe_min_cosine_to_torch": round(cosine, 6),
    }


def _write_onnx(folder: Path, quantize: str | None) -> str | None:
    """onnx/model.onnx: Optimum's float32 export, or ONNX Runtime's dynamic int8 quantisation of it."""
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    model = SentenceTransformer(str(folder), backend="onnx", device="cpu")  # no onnx file yet: Optimum exports
    if quantize is None:
        _save_backend_files(model, folder, "onnx")
        return None
    preset = onnx_int8_preset()
    export_dynamic_quantized_onnx_model(model, preset, str(folder), file_suffix="int8")
    _make_default(folder / "onnx", "model_int8.onnx", "model.onnx")
    return f"onnxruntime dynamic int8 ({preset} preset)"


def _write_openvino(folder: Path, quantize: str | None, calibration: list[str] | None) -> str | None:
    """openvino/openvino_model.xml (+ .bin): Optimum Intel's float32 export with its `position_ids` input computed
    inside the graph (`_fold_position_ids`), or NNCF's static int8 quantisation of that model calibrated on
    `calibration`."""
    # load_in_8bit=False: Optimum Intel otherwise compresses the weights of models over 1B parameters to int8 unasked.
    model = SentenceTransformer(str(folder), backend="openvino", device="cpu", model_kwargs={"load_in_8bit": False})
    _save_backend_files(model, folder, "openvino")
    _fold_position_ids(folder / "openvino" / "openvino_model.xml")
    if quantize is None:
        return None
    from optimum.intel.openvino import OVQuantizationConfig
    from sentence_transformers.backend import export_static_quantized_openvino_model

    model = SentenceTransformer(str(folder), backend="openvino", device="cpu")  # the folded float32 file
    # A local dataset folder: sentence-transformers' exporter loads its calibration set with datasets.load_dataset.
    data = folder / "_calibration"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration), encoding="utf-8")
    export_static_quantized_openvino_model(
        model,
        OVQuantizationConfig(num_samples=len(calibration)),
        str(folder),
        dataset_name=str(data),
        dataset_config_name="default",
        dataset_split="train",
        column_name="text",
        file_suffix="int8",
    )
    shutil.rmtree(data)
    _make_default(folder / "openvino", "openvino_model_int8.xml", "openvino_model.xml")
    _make_default(folder / "openvino", "openvino_model_int8.bin", "openvino_model.bin")
    return f"openvino static int8 (NNCF post-training quantisation, {len(calibration)} calibration texts)"


def _fold_position_ids(xml: Path) -> None:
    """Replace the `position_ids` input of an exported decoder by 0..L-1 computed from `input_ids`' shape.

    Optimum Intel (2.2.0) exports decoders for feature extraction with a `position_ids` input that its
    OVModelForFeatureExtraction.forward never fills, so OpenVINO reads whatever the buffer holds: embeddings that
    change from call to call, often NaN (measured on tiny Llamas). 0..L-1 on every row is what the PyTorch model uses
    when given none (spt-embed pads on the right), so the folded graph computes the PyTorch export's embeddings."""
    import numpy as np
    import openvino
    import openvino.opset13 as ops

    model = openvino.Core().read_model(str(xml))
    inputs = {name: param for param in model.get_parameters() for name in param.output(0).get_names()}
    if "position_ids" not in inputs:
        return
    param = inputs["position_ids"]
    shape = ops.shape_of(inputs["input_ids"], "i64")  # [batch, length]
    length = ops.gather(shape, ops.constant(1, np.int64), ops.constant(0, np.int64))
    positions = ops.range(ops.constant(0, np.int64), length, ops.constant(1, np.int64), "i64")
    positions = ops.broadcast(ops.unsqueeze(positions, ops.constant([0], np.int64)), shape)
    if param.get_element_type() != positions.get_output_element_type(0):
        positions = ops.convert(positions, param.get_element_type())
    for target in list(param.output(0).get_target_inputs()):
        target.replace_source_output(positions.output(0))
    model.remove_parameter(param)
    model.validate_nodes_and_infer_types()
    scratch = xml.with_name("_folded.xml")
    openvino.save_model(model, str(scratch), compress_to_fp16=False)  # save_model halves the weights by default
    del model
    os.replace(scratch, xml)
    os.replace(scratch.with_suffix(".bin"), xml.with_suffix(".bin"))


def _save_backend_files(model: SentenceTransformer, folder: Path, subfolder: str) -> None:
    """Move the backend model's own files (`subfolder`/) into the export; the plain export's config, tokenizer and
    modules stay as written."""
    scratch = folder / f"_{subfolder}_export"
    model.transformers_model.save_pretrained(str(scratch))  # sentence-transformers saves these into scratch/subfolder
    os.replace(scratch / subfolder, folder / subfolder)
    shutil.rmtree(scratch)


def _make_default(directory: Path, name: str, default: str) -> None:
    """Give the quantised file the name sentence-transformers loads by default (no float32 file was saved beside
    it), so that `SentenceTransformer(out, backend=...)` loads it without `model_kwargs={"file_name": ...}`. Weights
    an ONNX file over 2 GB keeps beside itself are found through the location recorded inside it, which stays valid."""
    os.replace(directory / name, directory / default)
