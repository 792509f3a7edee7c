"""Distributed encoding (`index --engine ray`, encode_corpus_ray): the same index as the one-process path, resume
after a lost block, refusals. Tests marked `ray` start a local Ray (2 CPUs) on a tiny random model; the others run
the pieces in this process (planning, the actor class, block writing, the index from parquet) or need no cluster.
"""

import dataclasses
import json
import socket
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spt_embed import SuffixPromptEncoder, encode_corpus_ray, index_from_parquet
from spt_embed.cli.main import main
from spt_embed.retrieval.corpus import CorpusSpec
from spt_embed.retrieval.index import load_index
from spt_embed.retrieval.indexing import index_corpus
from spt_embed.retrieval.metadata import OnDuplicate
from spt_embed.retrieval.parquet_shards import EmbeddingsMetadata, block_path
from spt_embed.retrieval.ray_encoding import BlockEncoder, describe_model, plan_blocks, write_encoded_blocks

from .conftest import WORDS

PLAIN_WORDS = [w for w in WORDS if w.isalpha()]
BLOCK = 8


def _rows():
    """37 BEIR-style records: titles on some, an integer id, a non-ASCII id, an empty text, a repeated id."""
    rows = []
    for i in range(36):
        text = " ".join(np.random.default_rng(i).choice(PLAIN_WORDS, 2 + i % 6))
        rows.append({"_id": f"d{i}", "title": "big house" if i % 4 == 0 else "", "text": text})
    rows[3]["_id"], rows[5]["_id"], rows[9]["text"] = 3, "ü-5", ""
    rows.append({"_id": "d7", "title": "", "text": "a repeated id"})
    return rows


@pytest.fixture(scope="module")
def adapters(backbones, tmp_path_factory):
    """Two saved suffix adapters on the tiny Llama: their folder names are the model specs the workers open."""
    root = tmp_path_factory.mktemp("adapters")
    for name, options in (("a", {}), ("b", {"init": "random", "seed": 1})):
        SuffixPromptEncoder.from_backbone(backbones["llama"], num_tokens=4, device="cpu", **options).save(
            str(root / name)
        )
    return root / "a", root / "b"


@pytest.fixture
def corpus(tmp_path):
    """The records as jsonl (with a blank line) and as parquet."""
    rows = _rows()
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(lines[:4] + [""] + lines[4:]) + "\n", encoding="utf-8")
    table = pa.table({key: [str(row[key]) for row in rows] for key in ("_id", "title", "text")})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=10)
    return {"jsonl": jsonl, "parquet": tmp_path / "corpus.parquet"}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def vectors(index) -> np.ndarray:
    return index.faiss_index.reconstruct_n(0, index.faiss_index.ntotal)


def assert_same_index(found, expected):
    assert found.ids == expected.ids
    np.testing.assert_allclose(vectors(found), vectors(expected), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(found.offsets, expected.offsets)
    for name in ("fingerprint", "dimension", "count", "skipped_empty", "model", "backbone_fingerprint", "index_type",
                 "factory", "query_prompt", "prompt_routes", "dtype", "corpus"):
        assert getattr(found.metadata, name) == getattr(expected.metadata, name), name


# ----- on a local Ray --------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ray_index_equals_the_one_process_index(local_ray, adapters, corpus, tmp_path, fmt):
    options = ["--block-size", BLOCK, "--on-duplicate", "keep-first", "--query-prompt", "find: "]
    single = tmp_path / "single"
    assert main([str(a) for a in ["index", "--model", adapters[0], "--corpus", corpus[fmt], "--output", single,
                                  *options]]) == 0
    distributed = tmp_path / "ray"
    argv = ["index", "--engine", "ray", "--num-workers", 2, "--model", adapters[0], "--corpus", corpus[fmt],
            "--output", distributed, "--keep-parts", *options]
    assert main([str(a) for a in argv]) == 0

    found, expected = load_index(distributed), load_index(single)
    assert len(found) == 35 and found.metadata.skipped_empty == 1  # 37 records, less one empty and one repeat
    assert_same_index(found, expected)
    text = expected.document_text("ü-5")
    assert text and found.document_text("ü-5") == text  # snippets read back from the corpus
    meta = EmbeddingsMetadata.load(tmp_path / "ray.parquet")
    assert (meta.complete, meta.blocks, meta.count, meta.precision) == (True, 5, 35, "float32")
    assert json.loads((tmp_path / "ray.parquet" / "embeddings.json").read_text())["fingerprint"] == meta.fingerprint


@pytest.mark.ray
def test_a_lost_block_is_encoded_again_and_only_it(local_ray, adapters, corpus, tmp_path, caplog):
    out = tmp_path / "emb"
    options = dict(block_size=BLOCK, on_duplicate="keep-first", num_workers=1)
    meta = encode_corpus_ray(adapters[0], corpus["jsonl"], out, **options)
    blocks = [block_path(out, number) for number in range(meta.blocks)]
    before = {path.name: path.stat().st_ino for path in blocks}
    blocks[2].unlink()  # as if the run had been killed before block 2 was written

    encode_corpus_ray(adapters[0], corpus["jsonl"], out, **options)
    assert "1 of 5 block(s) to encode, 4 reused" in caplog.text
    after = {path.name: path.stat().st_ino for path in blocks}
    assert {name for name in before if after[name] != before[name]} == {blocks[2].name}  # the others untouched

    index_from_parquet(out, tmp_path / "idx")
    index_corpus(str(adapters[0]), corpus["jsonl"], tmp_path / "single", block_size=BLOCK, on_duplicate="keep-first")
    assert_same_index(load_index(tmp_path / "idx"), load_index(tmp_path / "single"))

    with pytest.raises(ValueError, match=r"emb holds embeddings made with fingerprint=.*--overwrite"):
        encode_corpus_ray(adapters[1], corpus["jsonl"], out, **options)
    with pytest.raises(ValueError, match="made with block_size=8, not 4"):
        encode_corpus_ray(adapters[0], corpus["jsonl"], out, **{**options, "block_size": 4})
    assert {path.name: path.stat().st_ino for path in blocks} == after  # the refusals wrote nothing


@pytest.mark.ray
def test_workers_must_fit_the_cluster(local_ray, adapters, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"3 workers of 1 CPU\(s\) do not fit the Ray cluster \(2 CPUs, 0 GPUs\)"):
        encode_corpus_ray(adapters[0], corpus["jsonl"], tmp_path / "emb", num_workers=3, on_duplicate="keep-first")
    with pytest.raises(ValueError, match=r"--gpus-per-worker 1 but the Ray cluster has 0 GPU\(s\)"):
        encode_corpus_ray(adapters[0], corpus["jsonl"], tmp_path / "emb", gpus_per_worker=1, on_duplicate="keep-first")
    assert not (tmp_path / "emb").exists()


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.ray
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_cluster_fails_within_seconds(adapters, corpus, tmp_path, capsys, scheme):
    address = f"{scheme}127.0.0.1:{_unused_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"Cannot reach a Ray cluster at '{address}'.*`ray start --head`"):
        encode_corpus_ray(adapters[0], corpus["jsonl"], tmp_path / "emb", address=address)
    argv = ["index", "--engine", "ray", "--address", address, "--model", adapters[0], "--corpus", corpus["jsonl"],
            "--output", tmp_path / "idx"]
    assert main([str(a) for a in argv]) == 2
    assert "Cannot reach a Ray cluster" in capsys.readouterr().err
    assert time.monotonic() - started < 10
    assert not (tmp_path / "emb").exists() and not (tmp_path / "idx.parquet").exists()


# ----- without a cluster -----------------------------------------------------------------------------------


def test_without_ray_the_error_names_the_extra(adapters, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'spt-embed\[ray\]'"):
        encode_corpus_ray(adapters[0], corpus["jsonl"], tmp_path / "emb")
    argv = ["index", "--engine", "ray", "--model", adapters[0], "--corpus", corpus["jsonl"], "--output", tmp_path / "i"]
    assert main([str(a) for a in argv]) == 2
    assert "pip install 'spt-embed[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-workers", "2"], "--num-workers only apply to --engine ray"),
        (["--address", "auto", "--gpus-per-worker", "1"], "--address, --gpus-per-worker only apply to --engine ray"),
        (["--engine", "ray", "--shard", "0/2"], "--shard splits the work by hand"),
    ],
)
def test_engine_flags_are_checked(adapters, corpus, tmp_path, capsys, flags, message):
    argv = ["index", "--model", adapters[0], "--corpus", corpus["jsonl"], "--output", tmp_path / "idx", *flags]
    assert main([str(a) for a in argv]) == 2
    assert message in capsys.readouterr().err


class _Split:
    """The batches a Ray dataset would hand back: blocks out of order, one of them cut in two."""

    def __init__(self, outputs):
        self.outputs = outputs

    def __iter__(self):
        last, *others = self.outputs
        head = {name: values[:3] for name, values in last.items()}
        tail = {name: values[3:] for name, values in last.items()}
        return iter([head, *reversed(others), tail])


@pytest.fixture
def torch_threads():
    """The actor code sets torch's thread count (one actor per CPU); run here, the count is restored after."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_pipeline_pieces_in_one_process(adapters, corpus, tmp_path, torch_threads, fmt):
    """What the actors and the driver do, without Ray: plan, BlockEncoder, writing blocks, index_from_parquet."""
    spec = CorpusSpec(str(corpus[fmt].resolve()))  # as index_corpus records it
    plans, skipped = plan_blocks(spec, BLOCK, OnDuplicate.KEEP_FIRST)
    assert (len(plans), skipped, sum(p.kept for p in plans)) == (5, 1, 35)
    assert plans[4].dropped == (36,)  # the repeated id "d7", record 36, is left out where the one-process path is
    model_spec = str(adapters[0].resolve())
    described = describe_model(model_spec, "float32", use_gpu=False, threads=1)
    encoder = BlockEncoder(model_spec, "float32", described["fingerprint"], spec.to_dict(), 4, False, 1)
    outputs = [encoder({"plan": np.array([plan.to_json()])}) for plan in plans]

    out = tmp_path / "emb"
    (out / "blocks").mkdir(parents=True)
    meta = EmbeddingsMetadata(**described, corpus=spec.to_dict(), model=model_spec, block_size=BLOCK,
                              on_duplicate="keep-first", skipped_empty=skipped, complete=True, blocks=5, count=35)
    meta.save(out)
    write_encoded_blocks(out, _Split(outputs), plans)
    index = index_from_parquet(out, tmp_path / "idx")
    index_corpus(model_spec, corpus[fmt], tmp_path / "single", block_size=BLOCK, on_duplicate="keep-first")
    assert_same_index(index, load_index(tmp_path / "single"))

    # A node that opens another model, or reads another corpus, at the same path:
    with pytest.raises(ValueError, match=r"with fingerprint \w+, not 0000 as planned: every node must see the same"):
        BlockEncoder(model_spec, "float32", "0000", spec.to_dict(), 4, False, 1)
    elsewhere = dataclasses.replace(plans[1], digest="0000")
    with pytest.raises(ValueError, match="block 1 of .* differs from the block the driver planned"):
        encoder({"plan": np.array([elsewhere.to_json()])})


def test_index_from_parquet_refuses_an_unfinished_folder(tmp_path):
    meta = EmbeddingsMetadata(fingerprint="f", dimension=4, corpus={"path": "c.jsonl"}, blocks=2)
    meta.save(tmp_path)
    with pytest.raises(ValueError, match="is incomplete: rerun"):
        index_from_parquet(tmp_path, tmp_path / "idx")
    meta.complete = True
    meta.save(tmp_path)
    with pytest.raises(ValueError, match=r"lacks block\(s\) 000000.parquet, 000001.parquet"):
        index_from_parquet(tmp_path, tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="not a folder of parquet embeddings"):
        index_from_parquet(tmp_path / "nothing", tmp_path / "idx")
