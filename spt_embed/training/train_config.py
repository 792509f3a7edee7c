"""The resolved configuration of a training run: CLI flags and YAML recipes both fill this dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from spt_embed.model.config import DeepOffsets, Init, Placement, Readout
from spt_embed.recipe import RecipeConfig, Scheduler

TRAIN_CONFIG_NAME = "train_config.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DOCUMENT_TASK = "document"  # the task prompt of retrieval documents (sentence-transformers' encode_document)
DOCUMENT_MAX_LENGTH = 512  # document_max_length when unset and `tasks` holds DOCUMENT_TASK (see TrainConfig)


class GradedLoss(str, enum.Enum):
    """The loss of a graded source (one with a `score` column): both rank its pairs by their gold similarity."""

    COSENT = "cosent"  # CoSENT (sentence-transformers' CoSENTLoss): cosine differences, scale 20
    ANGLE = "angle"  # AnglE (AnglELoss): the same ranking on angle differences in complex space


class SelectOn(str, enum.Enum):
    """What picks the best checkpoint among the dev evaluations."""

    STS = "sts"  # STS-B dev Spearman
    RETRIEVAL = "retrieval"  # the mean nDCG@10 of the retrieval dev sets (held-out rows of retrieval sources)
    MEAN = "mean"  # the mean of both


class Method(str, enum.Enum):
    SUFFIX = "suffix"  # suffix prompt tuning: K soft tokens after the text, on the frozen backbone
    DEEP_SUFFIX = "deep-suffix"  # the K soft tokens plus a trained offset to their states after every layer
    PROMPT = "prompt"  # Lester-style prompt tuning: the K soft tokens before the text (placement=prefix), full pass
    PREFIX = "prefix"  # prefix tuning (peft): K trained keys/values at every layer before the PromptEOL template
    LORA = "lora"  # the LoRA baseline: PromptEOL template, last token, LoRA on the backbone, saved as its peft adapter
    SPT = "suffix"  # the name spt-embed 0.1 used (an alias: the same member as SUFFIX)

    @classmethod
    def _missing_(cls, value: object) -> Method | None:
        return cls.SUFFIX if value == "spt" else None  # configs and flags written for 0.1 keep working


@dataclass
class TrainConfig(RecipeConfig):
    """Suffix prompt tuning (or its LoRA baseline) with in-batch InfoNCE; every field is a `spt-embed train` flag
    and a YAML key."""

    file_name: ClassVar[str] = TRAIN_CONFIG_NAME
    option_kind: ClassVar[str] = "training"

    method: Method = field(
        default=Method.SUFFIX,
        metadata={
            "help": "suffix (also 'spt'): train K soft tokens after the text on the frozen backbone. deep-suffix: "
            "the K soft tokens plus, after every decoder layer, a trained offset to their states (fast path too). "
            "prompt: the K soft tokens before the text (Lester-style; placement=prefix, full pass, read at the "
            "text's last token). prefix: prefix tuning (Li & Liang; peft), K trained keys/values at every "
            "layer in front of the PromptEOL template, read at its last token (full pass). lora: the baseline, LoRA on the backbone under the PromptEOL template (last "
            "token), saved as its peft adapter (lora/); `spt-embed merge-lora` writes a merged copy."
        },
    )
    output: str = field(default="", metadata={"help": "Output folder: adapter, logs, plot, checkpoints/."})
    backbone: str = field(default="smollm2-135m", metadata={"help": "Registered name, HF directory or GGUF file."})
    data: list[str] = field(
        default_factory=lambda: ["snli-triplets"],
        metadata={"help": "Training sources: preset names or files (jsonl/csv/tsv/parquet/saved dataset)."},
    )
    anchor_column: str | None = field(default=None, metadata={"help": "Column holding the anchor text."})
    positive_column: str | None = field(default=None, metadata={"help": "Column holding the positive text."})
    negative_column: str | None = field(default=None, metadata={"help": "Column holding a hard negative."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    num_tokens: int = field(default=16, metadata={"help": "K soft tokens (spt)."})
    init: Init = field(default=Init.TEXT, metadata={"help": "Soft-token init: random, vocab or text."})
    init_text: str | None = field(default=None, metadata={"help": "Text for init=text (PromptEOL tail if unset)."})
    placement: Placement = field(default=Placement.SUFFIX, metadata={"help": "suffix or prefix."})
    deep_offsets: DeepOffsets = field(
        default=DeepOffsets.STATES,
        metadata={
            "help": "deep-suffix: where the per-layer offsets act at the K soft positions: states (each decoder "
            "layer's output) or kv (the keys and values of each layer's attention: the P-tuning v2 form, fewer "
            "numbers)."
        },
    )
    readout: Readout = field(
        default=Readout.LAST,
        metadata={
            "help": "Where the embedding is read (spt): last (final state, last position), soft-mean (mean over "
            "the K soft positions) or layer-mix (trained weights over every layer at the last position)."
        },
    )
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "Hard text template before every text, e.g. 'This sentence : \"' (spt); the soft tokens follow "
            "the text. Saved as the encoder's default prompt, so encode() applies it too."
        },
    )
    tail: str | None = field(
        default=None,
        metadata={
            "help": "Hard text after every text, kept whole when a text is cut, e.g. '\" means in one word:\"' "
            "(suffix, deep-suffix, prompt): with --method prompt the embedding is then read at the tail's last "
            "token instead of wherever the cut fell."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Max tokens per training text incl. soft tokens."})
    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Task soft prompts beside the default one (suffix, deep-suffix), e.g. query document: the "
            "queries of retrieval sources train through `query`, their passages through `document`, every other "
            "text through the default; encode_query / encode_document use them after training."
        },
    )
    document_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Max tokens (incl. soft tokens) of a document: the passages of retrieval sources in training, "
            "encode_document after it (`spt-embed index`, mteb retrieval); queries and every other text keep "
            "max_length. Unset (None): 512 when --tasks includes document and max_length is below 512, else "
            "max_length; an explicit value always wins. Read by suffix and deep-suffix only."
        },
    )
    retrieval_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Sources of --data (files) whose anchor is a query and whose positive/negative are documents, "
            "routed as the retrieval presets (squad-qa, medquad-qa, scifact-train) are."
        },
    )
    oversample: list[str] = field(
        default_factory=list,
        metadata={
            "help": "SOURCE=N: repeat a source of --data N times in the training mix (after its retrieval dev rows "
            "are held out), so that batches come from it N times as often; e.g. scifact-train=16 for in-domain data."
        },
    )
    mine_negatives: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Retrieval sources of --data (presets or files of retrieval_data, pairs without a negative, e.g. "
            "medquad-qa scifact-train) that get a mined hard negative column: before training, the encoder as it "
            "starts (queries through encode_query, passages through encode_document) ranks the source's own "
            "training passages (after its retrieval dev rows are held out; never a test corpus) for each query "
            "with sentence-transformers' mine_hard_negatives, and the best-ranked passage that passes the "
            "false-negative guards (mine_range_min, mine_relative_margin, mine_max_score) within the top "
            "mine_range_max becomes the row's negative; a row with none gets a seeded random other passage. "
            "Saved in the run's mined/ folder and reused by --resume. Encoding costs time: as a guide, about "
            "0.3-0.4 s per 512-token passage for SmolLM2-135M on 2 CPU cores, so over an hour for medquad-qa's "
            "~14k passages and a few minutes for scifact-train's ~600."
        },
    )
    mine_range_min: int = field(
        default=0,
        metadata={
            "help": "Mining: skip the best this many ranked passages that pass the other guards (never the row's "
            "own positives) and take the next; a further guard against unlabelled positives, beside "
            "mine_relative_margin (0: take the best)."
        },
    )
    mine_range_max: int = field(
        default=100,
        metadata={
            "help": "Mining: pick the negative among the top this many ranked passages. An untrained encoder often "
            "ranks the positive low, and every passage ranked above it is within the margin: a larger value "
            "leaves fewer rows with a random negative instead."
        },
    )
    mine_relative_margin: float = field(
        default=0.05,
        metadata={
            "help": "Mining: a negative must score below the positive by at least this fraction of the positive's "
            "score magnitude (0.05: at most 95 percent of a positive score, the TopK-PercPos setting of "
            "NV-Retriever that sentence-transformers' docs recommend); 0: at most the positive's score."
        },
    )
    mine_max_score: float | None = field(
        default=None,
        metadata={"help": "Mining: a negative's cosine similarity to its query must not exceed this (unset: no cap)."},
    )
    freeze_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "Soft prompts that stay as initialised: 'default' and/or task names from --tasks."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha, scale = alpha / r (lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (lora)."})
    lora_targets: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "Module names that get LoRA (lora): the attention projections by default."},
    )
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=32, metadata={"help": "Rows per step (per process)."})
    max_steps: int = field(default=300, metadata={"help": "Optimiser steps."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps."})
    scheduler: Scheduler = field(default=Scheduler.LINEAR, metadata={"help": "LR decay after warm-up."})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (scale = 1/temperature)."})
    symmetric: bool = field(default=False, metadata={"help": "Also score positives against anchors."})
    cached: bool = field(default=False, metadata={"help": "GradCache (CachedMNRL): big batches in small memory."})
    mini_batch_size: int = field(default=16, metadata={"help": "Mini-batch size of the cached loss."})
    graded_loss: GradedLoss = field(
        default=GradedLoss.COSENT,
        metadata={
            "help": "Loss of a graded source (a `score` column, e.g. the stsb-train-scored preset): cosent or "
            "angle; pair and triplet sources keep InfoNCE."
        },
    )
    eval_steps: int = field(default=50, metadata={"help": "Evaluate on STS-B dev every N steps (0: never)."})
    eval_pairs: int = field(default=0, metadata={"help": "Random STS-B dev pairs to evaluate on (0: all 1500)."})
    retrieval_dev_rows: int = field(
        default=0,
        metadata={
            "help": "Rows held out of every retrieval source (seeded, never trained on) for a retrieval dev set: "
            "their queries against their passages and negatives, nDCG@10, evaluated with STS-B dev. 0: none."
        },
    )
    select_on: SelectOn = field(
        default=SelectOn.STS,
        metadata={
            "help": "What selects the best checkpoint: sts (STS-B dev), retrieval (mean nDCG@10 of the retrieval "
            "dev sets) or mean (of both)."
        },
    )
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (the best is always kept)."})
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Mixed precision: bfloat16 autocast around the frozen backbone's matrix products, the trained "
            "parameters kept in float32 (on a GPU; a CPU without native bfloat16 emulates it, slower)."
        },
    )
    recompute_mlp: bool = field(
        default=False,
        metadata={
            "help": "Fast path (suffix, deep-suffix): the soft tokens' MLPs keep only their input for backward and "
            "recompute gate and up there: less memory per step (about a quarter less on SmolLM2), more time."
        },
    )
    logging_steps: int = field(default=5, metadata={"help": "Log the loss every N steps."})
    seed: int = field(default=42, metadata={"help": "Seed for init, data order and everything else."})

    def oversample_factors(self) -> dict[str, int]:
        """`oversample` as {source of data: N}, each N an integer >= 1 and each source one of `data`."""
        factors: dict[str, int] = {}
        for entry in self.oversample:
            source, sep, count = entry.rpartition("=")
            if not sep or not source or not count.strip().isdigit() or int(count) < 1:
                raise ValueError(
                    f"oversample {entry!r}: expected SOURCE=N with N an integer >= 1, e.g. scifact-train=16."
                )
            if source not in self.data:
                raise ValueError(
                    f"oversample {entry!r}: {source!r} is not among the training sources (data: {self.data})."
                )
            if source in factors:
                raise ValueError(f"oversample names {source!r} twice.")
            factors[source] = int(count)
        return factors

    def is_retrieval_source(self, source: str) -> bool:
        """A query -> passage source of `data`: a retrieval preset, or a file named in retrieval_data."""
        from spt_embed.training.data import PRESETS  # names and descriptions only: no datasets import

        return source in self.retrieval_data or (source in PRESETS and PRESETS[source].retrieval)

    def check_mining(self) -> None:
        """mine_negatives names retrieval sources of `data`, each once, and the mining knobs are in range. Whether
        a source already has a negative column is known only once it is read (`spt_embed.training.mining`)."""
        from spt_embed.training.data import PRESETS  # names and descriptions only: no datasets import

        seen: set[str] = set()
        for source in self.mine_negatives:
            if source not in self.data:
                raise ValueError(
                    f"mine_negatives {source!r} is not among the training sources (data: {self.data})."
                )
            if source in seen:
                raise ValueError(f"mine_negatives names {source!r} twice.")
            seen.add(source)
            if source in PRESETS and not PRESETS[source].retrieval:
                raise ValueError(
                    f"mine_negatives {source!r}: preset {source!r} is not a retrieval source (query -> passage); "
                    f"mined negatives are passages ranked for a query. Retrieval presets: "
                    f"{[name for name, preset in PRESETS.items() if preset.retrieval]}."
                )
            if not self.is_retrieval_source(source):
                raise ValueError(
                    f"mine_negatives {source!r}: not a retrieval source. Mined negatives are passages ranked for a "
                    f"query: if its anchor is a query and its positive a passage, name it in retrieval_data too."
                )
        if self.mine_range_min < 0:
            raise ValueError(f"mine_range_min must be >= 0, got {self.mine_range_min}.")
        if self.mine_range_max <= self.mine_range_min:
            raise ValueError(
                f"mine_range_max ({self.mine_range_max}) must exceed mine_range_min ({self.mine_range_min}): the "
                f"negative is picked among ranks mine_range_min+1 .. mine_range_max."
            )
        if not 0.0 <= self.mine_relative_margin < 1.0:
            raise ValueError(f"mine_relative_margin must be in [0, 1), got {self.mine_relative_margin}.")
        if self.mine_max_score is not None and not -1.0 < self.mine_max_score <= 1.0:
            raise ValueError(
                f"mine_max_score must be a cosine similarity in (-1, 1] or unset, got {self.mine_max_score}."
            )

    def resolved_document_max_length(self) -> int | None:
        """document_max_length as given; when unset, DOCUMENT_MAX_LENGTH (512) for a run with a `document` task
        prompt whose max_length is below that (a suffix or deep-suffix run, the methods with task prompts and the
        only ones reading this field, with fewer than 512 soft tokens), so that retrieval documents are not cut at
        the queries' length; None (= max_length) otherwise. Resolved once, in __post_init__, so the run's saved
        train_config.json records the length it trained documents at; an adapter reads its own spt_config.json
        (task_max_length), never this, so adapters saved before the default keep theirs."""
        if self.document_max_length is not None:
            return self.document_max_length
        if (
            DOCUMENT_TASK in self.tasks
            and self.method in (Method.SUFFIX, Method.DEEP_SUFFIX)
            and self.num_tokens < DOCUMENT_MAX_LENGTH
            and self.max_length < DOCUMENT_MAX_LENGTH
        ):
            return DOCUMENT_MAX_LENGTH
        return None

    def __post_init__(self) -> None:
        self.check_types()  # also: one string for a list field becomes a list, enum values become members
        positive = {"num_tokens", "batch_size", "max_steps", "max_length", "logging_steps", "mini_batch_size", "lora_r"}
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("lr", "temperature", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.eval_steps and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps={self.save_steps} must be a multiple of eval_steps={self.eval_steps}: the best dev "
                f"checkpoint is kept, so every evaluated step needs a checkpoint."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.lora_targets:
            raise ValueError(f"lora_targets is empty; name the modules that get LoRA, e.g. {LORA_TARGETS}.")
        if not self.data:
            raise ValueError("No training data: pass --data with a preset name or a file.")
        if self.method is Method.PREFIX and self.init is Init.VOCAB:
            # Checked here, before a run folder is made or data is read.
            raise ValueError("method=prefix supports init text (the backbone's keys/values of init_text) or random.")
        if self.tail is not None and self.method in (Method.PREFIX, Method.LORA):
            raise ValueError(
                f"tail={self.tail!r}: method {self.method.value!r} reads the last token of its own PromptEOL "
                f"template, whose tail is already kept; --tail is for suffix, deep-suffix and prompt."
            )
        if self.deep_offsets is not DeepOffsets.STATES and self.method is not Method.DEEP_SUFFIX:
            raise ValueError(
                f"deep_offsets={self.deep_offsets.value!r} is an option of method deep-suffix, not "
                f"{self.method.value!r}."
            )
        if self.tasks and self.method not in (Method.SUFFIX, Method.DEEP_SUFFIX):
            raise ValueError(
                f"tasks={self.tasks!r}: task soft prompts exist for method suffix and deep-suffix only, not "
                f"{self.method.value!r}."
            )
        self.document_max_length = self.resolved_document_max_length()
        if self.document_max_length is not None and self.method not in (Method.SUFFIX, Method.DEEP_SUFFIX):
            raise ValueError(
                f"document_max_length is read by method suffix and deep-suffix only; method {self.method.value!r} "
                f"cuts every text at max_length: set that instead."
            )
        known = {"default", *self.tasks}
        unknown = [name for name in self.freeze_prompts if name not in known]
        if unknown:
            raise ValueError(f"freeze_prompts {unknown}: not a prompt of this run (its prompts: {sorted(known)}).")
        if known <= set(self.freeze_prompts) and self.method in (Method.SUFFIX, Method.DEEP_SUFFIX):
            if self.method is Method.SUFFIX and self.readout is not Readout.LAYER_MIX:
                raise ValueError("freeze_prompts freezes every soft prompt: nothing would train.")
        self.oversample_factors()  # SOURCE=N entries: checked here, before a run folder is made or data is read
        stray = [source for source in self.retrieval_data if source not in self.data]
        if stray:
            raise ValueError(f"retrieval_data {stray} is not among the training sources (data: {self.data}).")
        self.check_mining()  # checked here, before a run folder is made or data is read
        if self.document_max_length is not None and self.document_max_length <= self.num_tokens:
            raise ValueError(
                f"document_max_length must exceed the {self.num_tokens} soft tokens, got {self.document_max_length}."
            )
        if self.retrieval_dev_rows < 0:
            raise ValueError(f"retrieval_dev_rows must be >= 0, got {self.retrieval_dev_rows}.")
        if self.select_on is not SelectOn.STS and not self.retrieval_dev_rows:
            raise ValueError(
                f"select_on={self.select_on.value!r} needs a retrieval dev set: set retrieval_dev_rows (e.g. 200)."
            )
        if self.tail == "":
            raise ValueError("tail is empty; give the text (e.g. '\" means in one word:\"') or leave it unset.")
        if self.prompt == "":
            raise ValueError("prompt is empty; give the template text (e.g. 'This sentence : \"') or leave it unset.")
