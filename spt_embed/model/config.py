"""The persisted configuration of a suffix-prompt adapter (``spt_config.json``)."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spt_embed.atomic import write_text
from spt_embed.recipe import parse_enum

CONFIG_NAME = "spt_config.json"
WEIGHTS_NAME = "soft_prompt.safetensors"
WEIGHTS_KEY = "soft_prompt"
LAYER_WEIGHTS_KEY = "layer_weights"  # the layer-mix readout's weights, beside the soft tokens in WEIGHTS_NAME
LAYER_OFFSETS_KEY = "layer_offsets"  # deep-suffix: per-layer offsets (N, K, H) at the soft positions, same file
KV_OFFSETS_KEY = "kv_offsets"  # deep-suffix, deep_offsets='kv': per-layer key/value offsets (N, 2, K, kv width)
DEFAULT_TASK_PROMPT = "default"  # how freeze lists and index metadata name the prompt of texts without a task
TASK_NAME = re.compile(r"[a-z][a-z0-9_-]*")  # a task soft prompt's name: lower case, as sentence-transformers' tasks


def task_weights_key(task: str) -> str:
    """The key of task `task`'s soft tokens (K, H) in the weights file, beside the default prompt's."""
    return f"{WEIGHTS_KEY}.{task}"


class AdapterMethod(str, enum.Enum):
    """What an adapter trains on the frozen backbone besides (or with) its K soft tokens."""

    SUFFIX = "suffix"  # K soft tokens after the text, nothing else
    DEEP_SUFFIX = "deep-suffix"  # plus, at every decoder layer, a trained offset to the K soft positions' states


class DeepOffsets(str, enum.Enum):
    """Where a deep suffix's per-layer offsets act at the K soft positions."""

    STATES = "states"  # each decoder layer's output there (K x hidden per layer)
    KV = "kv"  # the keys and values each layer's attention computes there: the P-tuning v2 form (K x 2 x kv width)


class Init(str, enum.Enum):
    """How the K soft-token vectors start."""

    RANDOM = "random"  # N(0, std of the vocabulary embeddings)
    VOCAB = "vocab"  # embeddings of K real tokens sampled from the vocabulary
    TEXT = "text"  # embeddings of `init_text`'s tokens, tiled or trimmed to K


class Placement(str, enum.Enum):
    """Where the soft tokens go relative to the text."""

    SUFFIX = "suffix"  # after the text: the default and the paper's choice
    PREFIX = "prefix"  # before the text (Lester et al. 2021), for ablations


class Readout(str, enum.Enum):
    """Where the embedding is read from the backbone's hidden states."""

    LAST = "last"  # the final hidden state at the last position (after the K soft tokens with suffix placement)
    SOFT_MEAN = "soft-mean"  # the mean of the final hidden states at the K soft positions
    LAYER_MIX = "layer-mix"  # trained weights over every layer's state (embeddings included) at the last position


@dataclass
class BackboneRef:
    """What the adapter was trained on: enough to find the backbone again and to recognise it."""

    source: str = field(metadata={"help": "Registered name, local HF directory or GGUF file of the backbone."})
    fingerprint: str = field(metadata={"help": "Hash of the backbone's config and a sample of its weights."})
    model_type: str = field(default="", metadata={"help": "transformers model_type, e.g. 'llama'."})
    hidden_size: int = field(default=0, metadata={"help": "Width of the hidden states = width of a soft token."})
    is_causal: bool = field(default=True, metadata={"help": "False when the backbone runs bidirectionally."})


@dataclass
class SuffixPromptConfig:
    """Everything that defines a suffix-prompt encoder apart from its backbone weights and soft vectors."""

    backbone: BackboneRef = field(metadata={"help": "The frozen decoder the soft tokens were trained for."})
    num_tokens: int = field(default=16, metadata={"help": "K, the number of trainable soft tokens."})
    init: Init = field(default=Init.TEXT, metadata={"help": "Initialisation: random, vocab or text."})
    init_text: str = field(
        default='" means in one word:"',
        metadata={
            "help": "String whose token embeddings initialise the soft tokens when init='text' (the PromptEOL "
            "tail by default); tiled or trimmed so that it ends at the last soft token."
        },
    )
    placement: Placement = field(default=Placement.SUFFIX, metadata={"help": "suffix (default) or prefix."})
    tail: str = field(
        default="",
        metadata={
            "help": "Hard text after every text (the closing part of a template such as PromptEOL's "
            "'\" means in one word:\"'), tokenized apart and kept whole when a long text is cut, so that a "
            "`last` readout with placement='prefix' reads it rather than the token where the cut fell; with "
            "placement='suffix' it sits between the text and the soft tokens. Configs written without this field "
            "read '' (none)."
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Maximum sequence length including the K soft tokens; texts are cut to fit."}
    )
    readout: Readout = field(
        default=Readout.LAST,
        metadata={
            "help": "Where the embedding is read: last (the last position's final hidden state), soft-mean (mean "
            "over the K soft positions) or layer-mix (trained per-layer weights at the last position, saved with "
            "the soft tokens). Configs written without this field read 'last'."
        },
    )
    method: AdapterMethod = field(
        default=AdapterMethod.SUFFIX,
        metadata={
            "help": "suffix (the K soft tokens alone) or deep-suffix (plus a trained offset to the soft positions' "
            "states after every decoder layer, saved beside the soft tokens). Configs written without this field "
            "read 'suffix'."
        },
    )
    deep_offsets: DeepOffsets = field(
        default=DeepOffsets.STATES,
        metadata={
            "help": "method='deep-suffix' only: where its per-layer offsets act at the K soft positions: states "
            "(each decoder layer's output, K x hidden numbers a layer) or kv (the keys and values of each layer's "
            "attention, before the rotary embedding: the P-tuning v2 form, K x 2 x key/value width a layer). "
            "Configs written without this field read 'states'."
        },
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Names of task soft prompts beside the default one, e.g. ['query', 'document']: each is K soft "
            "tokens of its own on the same backbone, used for the texts encoded under that task "
            "(sentence-transformers' encode_query / encode_document pass task='query' / 'document'); every "
            "other text (encode(), STS, classification) goes through the default prompt. Empty: one prompt."
        },
    )
    task_max_length: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Maximum sequence length (incl. the K soft tokens) per task, e.g. {'query': 128, 'document': "
            "512}: long documents, short queries. A task not named here uses max_length."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for random and vocab initialisation."})
    spt_embed_version: str = field(default="", metadata={"help": "Library version that wrote the config."})

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneRef(**self.backbone)
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {self.num_tokens!r}.")
        self.init = parse_enum(Init, self.init, "init")
        self.placement = parse_enum(Placement, self.placement, "placement")
        self.readout = parse_enum(Readout, self.readout, "readout")
        self.method = parse_enum(AdapterMethod, self.method, "method")
        self.deep_offsets = parse_enum(DeepOffsets, self.deep_offsets, "deep_offsets")
        if self.deep_offsets is not DeepOffsets.STATES and self.method is not AdapterMethod.DEEP_SUFFIX:
            raise ValueError(
                f"deep_offsets={self.deep_offsets.value!r} is an option of method='deep-suffix' (the per-layer "
                f"offsets); method={self.method.value!r} has none."
            )
        if self.method is AdapterMethod.DEEP_SUFFIX and self.placement is not Placement.SUFFIX:
            raise ValueError(
                "method='deep-suffix' offsets the states of soft tokens that follow the text; it needs "
                "placement='suffix'."
            )
        if self.readout is Readout.SOFT_MEAN and self.placement is Placement.PREFIX and self.backbone.is_causal:
            raise ValueError(
                "readout='soft-mean' with placement='prefix' on a causal backbone reads soft tokens that come before "
                "the text and so never see it: every text would get the same embedding. Use placement='suffix' or "
                "another readout."
            )
        if not isinstance(self.tail, str):
            raise ValueError(f"tail must be a string ('' for none), got {self.tail!r}.")
        self.tasks = list(self.tasks)
        bad = [task for task in self.tasks if not isinstance(task, str) or not TASK_NAME.fullmatch(task)]
        bad += [task for task in self.tasks if task == DEFAULT_TASK_PROMPT]  # the name of the default prompt
        if bad or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(
                f"tasks must be distinct lower-case names such as 'query' and 'document', got {self.tasks!r}."
            )
        self.task_max_length = dict(self.task_max_length)
        for task, length in self.task_max_length.items():
            if not isinstance(task, str) or not TASK_NAME.fullmatch(task):
                raise ValueError(f"task_max_length: {task!r} is not a task name (lower case, e.g. 'document').")
            if not isinstance(length, int) or isinstance(length, bool) or length <= self.num_tokens:
                raise ValueError(
                    f"task_max_length[{task!r}] must be an integer above the {self.num_tokens} soft tokens, got "
                    f"{length!r}."
                )
        if self.init is Init.TEXT and not self.init_text.strip():
            raise ValueError("init='text' needs a non-empty init_text; pass init_text='...' or use init='vocab'.")
        if self.max_length <= self.num_tokens:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for text next to {self.num_tokens} soft tokens; "
                f"use max_length > num_tokens."
            )
        if not self.spt_embed_version:
            from spt_embed._version import __version__

            self.spt_embed_version = __version__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["init"] = self.init.value
        data["placement"] = self.placement.value
        data["readout"] = self.readout.value
        data["method"] = self.method.value
        data["deep_offsets"] = self.deep_offsets.value
        return data

    def save(self, directory: str | Path) -> None:
        write_text(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> SuffixPromptConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a spt-embed adapter folder. "
                f"Create one with SuffixPromptEncoder.from_backbone(...).save(dir) or `spt-embed train`."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the adapter config is corrupted.") from None
        if not isinstance(data, dict) or "backbone" not in data:
            raise ValueError(f"{path} has no 'backbone' entry; the adapter config is corrupted.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; it was written by a newer spt-embed?")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{path} does not describe a valid adapter: {exc}") from None
