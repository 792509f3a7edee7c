"""Distributed encoding of a corpus file on a Ray cluster (Ray Data), into a folder of parquet blocks.

    driver    reads the corpus once with the corpus readers and cuts it into blocks of `block_size` documents
              (empty texts and repeated ids dropped as the one-machine path drops them); a block already in the
              output folder with the digest the corpus still gives is kept, the others are planned:
              where the block starts in the file, how many documents it reads, its digest
    Ray Data  from_items(plans) -> map_batches(BlockEncoder, concurrency=N, num_gpus=g): an actor pool, one
              encoder per actor, opened from the model spec; an actor reads its block from the corpus file
              (from the block's start position), checks the digest and encodes the block longest text first
    driver    writes each block as OUTPUT/blocks/NNNNNN.parquet (atomically) once all its rows have arrived

`index_from_parquet` (spt_embed.retrieval.parquet_shards) then builds the index from the blocks.

The corpus is not read with ray.data.read_json / read_text: both read a whole file in one task, read_text splits
lines on more than b"\\n" (a JSON string may hold U+2028) and read_json infers column types from the data (a corpus
with integer and string ids fails), and neither numbers rows, which resumable blocks need. Reading through the
library's readers keeps ids and joined texts those of `spt-embed index`; the digest check makes a node that sees
another corpus file fail rather than mix corpora. Every node needs the corpus file and the model at the same path
(a shared filesystem) and spt-embed installed; the blocks land on the driver's machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spt_embed.recipe import enum_text, parse_enum
from spt_embed.retrieval.corpus import CorpusSpec, Position, iter_documents
from spt_embed.retrieval.faiss_factory import IndexType
from spt_embed.retrieval.metadata import DEFAULT_BLOCK_SIZE, META_FILE, OnDuplicate
from spt_embed.retrieval.parquet_shards import (
    BLOCKS_DIR,
    EMBEDDINGS_FILE,
    EmbeddingsMetadata,
    index_from_parquet,
    stored_block,
    write_block,
)
from spt_embed.retrieval.ray_cluster import CONNECT_TIMEOUT_S, check_reachable, import_ray, ray_session, worker_count
from spt_embed.retrieval.shards import DuplicateIds, EmptyDocuments, block_digest

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BlockPlan:
    """What an actor needs to read and check block `number` of the corpus."""

    number: int
    start: Position  # where the block's first document starts
    documents: int  # documents to read from there (empty and repeated ones included)
    kept: int  # documents the block holds
    dropped: tuple[int, ...]  # records left out as repeated ids (keep-first)
    digest: str  # block_digest of the kept documents

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BlockPlan:
        data = json.loads(text)
        return cls(**{**data, "start": Position(**data["start"]), "dropped": tuple(data["dropped"])})


def plan_blocks(corpus: CorpusSpec, block_size: int, on_duplicate: OnDuplicate) -> tuple[list[BlockPlan], int]:
    """Every block of the corpus, and the number of documents with no text; a repeated id is an error unless
    keep-first. The blocks, digests and the documents left out are those of a one-machine shard folder."""
    empty, duplicates = EmptyDocuments(), DuplicateIds(on_duplicate, corpus.path)
    plans: list[BlockPlan] = []
    documents = iter_documents(corpus)
    with tqdm(unit="doc", desc=f"plan {Path(corpus.path).name}", dynamic_ncols=True) as bar:
        while block := list(islice(documents, block_size)):
            kept = [d for d in block if not empty.skip(d) and duplicates.keep(d.id, d.line)]
            records = {d.record for d in kept}
            dropped = tuple(d.record for d in block if d.text.strip() and d.record not in records)
            plans.append(BlockPlan(len(plans), block[0].position, len(block), len(kept), dropped, block_digest(kept)))
            bar.update(len(block))
    if duplicates.dropped:
        logger.warning("%s: dropped %d duplicate document(s), kept the first copy of each.", corpus.path,
                       duplicates.dropped)
    empty.report(Path(corpus.path), corpus.path)
    return plans, len(empty.lines)


def _open_model(model_spec: str, dtype: str, use_gpu: bool, threads: int):
    import torch

    from spt_embed.model.encoder import open_encoder

    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"A worker on {socket.gethostname()} was given a GPU but torch sees no CUDA device.")
    if not use_gpu:
        torch.set_num_threads(max(1, threads))  # one actor per `threads` CPUs: no oversubscription
    return open_encoder(model_spec, dtype=dtype, device="cuda" if use_gpu else "cpu")


def describe_model(model_spec: str, dtype: str, use_gpu: bool, threads: int) -> dict:
    """What the metadata records about the encoder (run as a Ray task, where the workers open it)."""
    from spt_embed.model.dtypes import weights_dtype
    from spt_embed.model.identity import model_fingerprint, prompt_routes

    model = _open_model(model_spec, dtype, use_gpu, threads)
    fingerprint, backbone = model_fingerprint(model)
    return {
        "fingerprint": fingerprint,
        "backbone_fingerprint": backbone,
        "dimension": model.get_embedding_dimension(),
        "prompt_routes": prompt_routes(model),
        "dtype": weights_dtype(model),
    }


class BlockEncoder:
    """A Ray Data callable class: one encoder per actor; a batch of block plans in, their rows and embeddings out."""

    def __init__(self, model_spec: str, dtype: str, fingerprint: str, corpus: dict, batch_size: int,
                 use_gpu: bool, threads: int):
        from spt_embed.model.identity import model_fingerprint

        self.model = _open_model(model_spec, dtype, use_gpu, threads)
        found = model_fingerprint(self.model)[0]
        if found != fingerprint:
            raise ValueError(
                f"On {socket.gethostname()}, {model_spec} opens a model with fingerprint {found}, not {fingerprint} "
                f"as planned: every node must see the same model files at that path."
            )
        self.corpus, self.batch_size = CorpusSpec(**corpus), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from spt_embed.retrieval.shards import encode_block

        columns: dict[str, list] = {"block": [], "id": [], "record": [], "offset": [], "embedding": []}
        for text in batch["plan"]:
            plan = BlockPlan.from_json(str(text))
            block = islice(iter_documents(self.corpus, start=plan.start), plan.documents)
            kept = [d for d in block if d.text.strip() and d.record not in plan.dropped]
            if block_digest(kept) != plan.digest:
                raise ValueError(
                    f"On {socket.gethostname()}, block {plan.number} of {self.corpus.path} differs from the block the "
                    f"driver planned: every node must see the same corpus file at that path."
                )
            columns["embedding"].append(encode_block(self.model, [d.text for d in kept], self.batch_size))
            columns["block"].append(np.full(len(kept), plan.number, dtype=np.int64))
            columns["id"].append(np.array([d.id for d in kept], dtype=object))
            columns["record"].append(np.array([d.record for d in kept], dtype=np.int64))
            columns["offset"].append(np.array([d.offset for d in kept], dtype=np.int64))
        return {name: np.concatenate(parts) for name, parts in columns.items()}


def _prepare_folder(output: Path, wanted: EmbeddingsMetadata, overwrite: bool, restart: bool) -> EmbeddingsMetadata:
    """The folder's metadata, new or resumed; a folder of another model or settings is refused (`restart`:
    started afresh)."""
    found = EmbeddingsMetadata.load(output) if (output / EMBEDDINGS_FILE).is_file() else None
    mismatch = found.mismatch(wanted) if found is not None else None
    if found is not None and (overwrite or (restart and mismatch)):
        if mismatch:
            logger.info("%s was made with %s; starting it afresh.", output, mismatch)
        shutil.rmtree(output)
        found = None
    if found is None:
        if output.exists() and any(output.iterdir()):
            raise FileExistsError(
                f"{output} exists and is not a folder of parquet embeddings; choose an empty or new output folder."
            )
        (output / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)
        wanted.save(output)
        return wanted
    if mismatch:
        raise ValueError(
            f"{output} holds embeddings made with {mismatch} (model {found.model!r}): they cannot be reused for "
            f"this run. Choose another output folder, or start afresh with --overwrite (Python: overwrite=True)."
        )
    wanted.save(output)  # the index settings (index type, query prompt) are this run's
    return wanted


def encode_corpus_ray(
    model: str | os.PathLike,
    corpus_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 32,
    block_size: int = DEFAULT_BLOCK_SIZE,
    index_type: str = IndexType.FLAT.value,
    query_prompt: str | None = None,
    corpus_format: str | None = None,
    id_field: str | None = None,
    text_field: str = "text",
    title_field: str | None = "title",
    skip_bad_lines: bool = False,
    on_duplicate: OnDuplicate | str = OnDuplicate.ERROR,
    dtype: str = "float32",
    overwrite: bool = False,
    restart: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> EmbeddingsMetadata:
    """Encode a corpus file on a Ray cluster into a folder of parquet blocks at `output`; returns its metadata.

    `model`: a model spec (adapter folder, bundled adapter name, SentenceTransformer folder) that every worker
    opens. `address`: "auto" joins the cluster this machine belongs to (or RAY_ADDRESS), None does the same or
    starts a local Ray, HOST:PORT or ray://HOST:PORT connects to one (a connection this process already has is
    used as it is). `num_workers` actors (default: as many as the cluster's CPUs, or GPUs, hold) with
    `cpus_per_worker` / `gpus_per_worker` each. A rerun keeps the blocks already written whose documents are
    unchanged and encodes the rest; `overwrite` starts the folder afresh, `restart` only if it was made with other
    settings (else such a folder is refused). Build the index with `index_from_parquet(output, index_folder)`.
    """
    from spt_embed.model.specs import classify

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a model spec (a folder or a bundled name) that every worker opens, got "
                        f"{type(model).__name__}.")
    for name, value in (("batch_size", batch_size), ("block_size", block_size), ("num_workers", num_workers or 1)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ValueError(f"cpus_per_worker must be > 0 and gpus_per_worker >= 0, got {cpus_per_worker}, "
                         f"{gpus_per_worker}.")
    import_ray()
    if address not in (None, "auto"):
        check_reachable(address, connect_timeout)  # before the corpus pass, which can take minutes
    spec = classify(os.fspath(model)).reopenable()  # absolute: the workers may start in another directory
    corpus = CorpusSpec(
        str(Path(corpus_path).expanduser().resolve()), format=corpus_format, id_field=id_field,
        text_field=text_field, title_field=title_field, skip_bad_lines=skip_bad_lines,
    )
    corpus.check_file()
    output = Path(output).expanduser()
    if (output / META_FILE).is_file():
        raise FileExistsError(f"{output} is an index folder; the parquet blocks need a folder of their own.")
    policy = parse_enum(OnDuplicate, on_duplicate, "on_duplicate")
    plans, skipped_empty = plan_blocks(corpus, block_size, policy)
    if not sum(plan.kept for plan in plans):
        raise ValueError(f"{corpus.path} contains no documents with text.")
    use_gpu, threads = gpus_per_worker > 0, max(1, int(cpus_per_worker))
    with ray_session(address) as ray:
        workers = worker_count(ray, num_workers, cpus_per_worker, gpus_per_worker)
        resources = {"num_cpus": cpus_per_worker, **({"num_gpus": gpus_per_worker} if use_gpu else {})}
        described = ray.get(ray.remote(describe_model).options(**resources).remote(spec, dtype, use_gpu, threads))
        wanted = EmbeddingsMetadata(
            **described, corpus=corpus.to_dict(), model=spec, block_size=block_size, on_duplicate=policy.value,
            index_type=enum_text(index_type), query_prompt=query_prompt,
        )
        meta = _prepare_folder(output, wanted, overwrite, restart)
        todo = _blocks_to_encode(output, plans, meta.dimension)
        if todo:
            encoder_options = dict(
                model_spec=spec, dtype=dtype, fingerprint=meta.fingerprint, corpus=corpus.to_dict(),
                batch_size=batch_size, use_gpu=use_gpu, threads=threads,
            )
            dataset = ray.data.from_items([{"plan": plan.to_json()} for plan in todo], override_num_blocks=len(todo))
            dataset = dataset.map_batches(
                BlockEncoder, fn_constructor_kwargs=encoder_options, batch_size=1, batch_format="numpy",
                concurrency=min(workers, len(todo)), **resources,
            )
            write_encoded_blocks(output, dataset.iter_batches(batch_size=None, batch_format="numpy"), todo)
    meta.complete, meta.blocks = True, len(plans)
    meta.count, meta.skipped_empty = sum(plan.kept for plan in plans), skipped_empty
    meta.save(output)
    logger.info("%s: %d documents in %d block(s) (%d encoded now).", output, meta.count, meta.blocks, len(todo))
    return meta


def _blocks_to_encode(output: Path, plans: list[BlockPlan], dimension: int) -> list[BlockPlan]:
    """The plans whose block file is missing, damaged or holds other documents; writes the blocks that have no
    documents to encode and removes block files beyond the corpus' end and unfinished writes."""
    for stale in (output / BLOCKS_DIR).glob(".*.tmp"):
        stale.unlink()
    for extra in (output / BLOCKS_DIR).glob("*.parquet"):
        if not extra.stem.isdigit() or int(extra.stem) >= len(plans):
            logger.info("%s: removing %s (the corpus has %d block(s)).", output, extra.name, len(plans))
            extra.unlink()
    todo = []
    for plan in plans:
        stored = stored_block(output, plan.number)
        if stored == (plan.digest, plan.kept):
            continue
        if stored is not None:
            logger.warning("%s: the corpus changed in block %d; encoding it again.", output, plan.number)
        if plan.kept:
            todo.append(plan)
        else:
            empty = np.zeros(0, dtype=np.int64)
            write_block(output, plan.number, [], empty, empty, np.zeros((0, dimension), np.float32), plan.digest)
    logger.info("%s: %d of %d block(s) to encode, %d reused.", output, len(todo), len(plans),
                len(plans) - len(todo))
    return todo


def write_encoded_blocks(output: Path, batches: Iterable[dict[str, np.ndarray]], todo: list[BlockPlan]) -> None:
    """Collect BlockEncoder's rows (a block may arrive in pieces, blocks in any order) and write each block as soon
    as all its rows are there; an error if a planned block never completes."""
    plans = {plan.number: plan for plan in todo}
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    with tqdm(total=sum(p.kept for p in todo), unit="doc", desc="encode (ray)", dynamic_ncols=True) as bar:
        for batch in batches:
            for number in np.unique(batch["block"]).tolist():
                rows = batch["block"] == number
                pieces = pending.setdefault(number, [])
                pieces.append({name: values[rows] for name, values in batch.items()})
                if sum(len(piece["id"]) for piece in pieces) < plans[number].kept:
                    continue
                block = {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
                order = np.argsort(block["record"], kind="stable")
                write_block(
                    output, number, [str(doc_id) for doc_id in block["id"][order]], block["record"][order],
                    block["offset"][order], block["embedding"][order], plans[number].digest,
                )
                del pending[number]
                bar.update(plans[number].kept)
    missing = [number for number in plans if stored_block(output, number) is None]
    if missing:
        raise RuntimeError(f"Ray returned no embeddings for block(s) {missing[:5]} of {output}; rerun to finish them.")


def index_corpus_ray(
    model: str | os.PathLike,
    corpus_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    index_type: str = IndexType.FLAT.value,
    precision: str = "float32",
    rescore_multiplier: int | None = None,
    overwrite: bool = False,
    keep_parts: bool = False,
    **options,
) -> Path:
    """`spt-embed index --engine ray`: encode into OUTPUT.parquet/ (encode_corpus_ray), build the index at
    `output` from it, then remove the blocks unless `keep_parts`. A killed run resumes from the blocks written."""
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite (Python: overwrite=True) to replace it.")
    if output.exists() and not (output / META_FILE).is_file():
        raise FileExistsError(f"{output} exists and is not an index folder; choose another output.")
    from spt_embed.retrieval.precision import check_precision

    check_precision(precision, index_type)  # before any encoding: a combination the index cannot hold loses nothing
    blocks = output.parent / f"{output.name}.parquet"
    # The blocks of an index run are its own: resumed when they fit, else started afresh.
    encode_corpus_ray(model, corpus_path, blocks, index_type=index_type, restart=True, **options)
    index_from_parquet(
        blocks, output, index_type=index_type, precision=precision, rescore_multiplier=rescore_multiplier,
        overwrite=overwrite,
    )
    if not keep_parts:
        shutil.rmtree(blocks)
    return output

