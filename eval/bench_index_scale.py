"""Index types at simulated scale: build time, size, search speed and recall@10 of flat, HNSW, IVF-PQ and on-disk IVF,
over random unit vectors at the encoder's dimension.

    python eval/bench_index_scale.py                              # sizes 10,000 100,000 1,000,000; dimension 576
    python eval/bench_index_scale.py --sizes 2000 --queries 50 --output /tmp/smoke.json      # a smoke run

For each size n: n random unit vectors (seeded; 576 dimensions, SmolLM2-135M's width, by default). The queries are
--queries database vectors, each moved by Gaussian noise of norm about --noise and renormalised, so that every query
has a true nearest neighbour (its source) and a meaningful exact top 10. Methods (--methods):

    flat    exact inner product, the `flat` preset: also the ground truth for recall (always built)
    hnsw    the `hnsw` preset (HNSW32, efConstruction 200, efSearch 128), in memory
    ivfpq   the `ivfpq` preset's factory for n (IVF + PQ, nprobe as the preset sets it), in memory
    ondisk  the same factory through the on-disk merge `index-merge` uses (spt_embed.retrieval.indexing.
            write_ondisk_index): trained once, --shards block indexes, merged by faiss.contrib.ondisk.merge_ondisk
            into index.ivfdata, the folder loaded with load_index (lists memory-mapped)

Per method: build_s (training included; ondisk: from training to the loaded folder, its shards being slices of the
vectors in memory rather than shard folders on disk), bytes_per_vector (index file size / n; ondisk: index.faiss +
index.ivfdata), batch_ms_per_query (all queries in one search call), single_ms_per_query (one query per call, the
first --single-queries), recall_at_10 (share of the exact top 10 found) and source_at_10 (share of queries whose
source vector is in the top 10). On random vectors only the source is a clear neighbour: the rest of the exact top
10 are near ties (cosines a few times 1/sqrt(dim) apart), which PQ's approximate scores do not separate, so
recall_at_10 is low for the compressed indexes here where clustered real embeddings would do better; source_at_10
shows whether the true neighbour is found. The on-disk lists were just written, so searches read them from the page
cache; a cold cache adds disk reads.

A size whose estimated peak memory exceeds the available memory (MemAvailable), or whose files exceed the free disk
of --workdir, is skipped, and the output says so. Writes --output (default eval/results/bench_index_scale.json) with
the command, faiss version, threads and CPU. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from spt_embed.hardware import cpu_name
from spt_embed.retrieval.faiss_factory import import_faiss, new_faiss_index, resolve_factory
from spt_embed.retrieval.indexing import write_ondisk_index
from spt_embed.retrieval.metadata import INDEX_FILE, IVFDATA_FILE, IndexMetadata

METHODS = ("flat", "hnsw", "ivfpq", "ondisk")
K = 10
CHUNK = 65_536  # rows normalised / added per step, to keep temporaries small


def random_unit_vectors(n: int, dimension: int, rng: np.random.Generator) -> np.ndarray:
    vectors = rng.standard_normal((n, dimension), dtype=np.float32)
    for start in range(0, n, CHUNK):
        block = vectors[start : start + CHUNK]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def perturbed_queries(vectors: np.ndarray, count: int, noise: float, rng: np.random.Generator):
    """`count` database rows moved by noise of norm ~`noise` and renormalised; returns (queries, source rows)."""
    sources = rng.choice(len(vectors), size=min(count, len(vectors)), replace=False)
    dimension = vectors.shape[1]
    queries = vectors[sources] + noise / np.sqrt(dimension) * rng.standard_normal((len(sources), dimension), np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32), sources


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def needs(n: int, dimension: int) -> tuple[int, int]:
    """Estimated peak memory and disk of one size, in bytes. Memory: the vectors plus the largest index beside them
    (HNSW: the vectors again plus 2 x 32 links of 4 bytes each, with slack). Disk: the flat and HNSW index files,
    written one at a time to measure their size, plus the on-disk index and its block indexes."""
    vectors = n * dimension * 4
    memory = 2 * vectors + n * 400 + 512 * 2**20
    disk = 2 * vectors + n * 600 + 256 * 2**20
    return memory, disk


def search_times(faiss_index, queries: np.ndarray, single: int) -> dict:
    """The top-10 rows of all queries, ms/query batched, and ms/query one at a time over the first `single`."""
    faiss_index.search(queries[:1], K)  # warm-up
    start = time.perf_counter()
    _, rows = faiss_index.search(queries, K)
    batch = (time.perf_counter() - start) * 1000 / len(queries)
    start = time.perf_counter()
    for query in queries[:single]:
        faiss_index.search(query[None], K)
    one = (time.perf_counter() - start) * 1000 / max(1, min(single, len(queries)))
    return {"rows": rows, "batch_ms_per_query": round(batch, 4), "single_ms_per_query": round(one, 4)}


def recall(rows: np.ndarray, exact: np.ndarray, sources: np.ndarray) -> dict:
    found = np.mean([len(set(row) & set(truth)) / K for row, truth in zip(rows, exact)])
    source = np.mean([source in row for row, source in zip(rows, sources)])
    return {"recall_at_10": round(float(found), 4), "source_at_10": round(float(source), 4)}


def file_bytes(*files: Path) -> int:
    return sum(file.stat().st_size for file in files)


def bench_size(n: int, args, workdir: Path) -> dict:
    faiss = import_faiss()
    rng = np.random.default_rng(args.seed)
    vectors = random_unit_vectors(n, args.dim, rng)
    queries, sources = perturbed_queries(vectors, args.queries, args.noise, rng)
    single = min(args.single_queries, len(queries))
    entry: dict = {"n": n, "queries": len(queries), "single_queries": single, "methods": {}}

    def sample(m: int) -> np.ndarray:
        # The same rows on every call: ivfpq and ondisk train on one sample, so they share their quantisers.
        return vectors[np.sort(np.random.default_rng(args.seed).choice(n, m, replace=False))]

    def add(index) -> None:
        for start in range(0, n, CHUNK):
            index.add(vectors[start : start + CHUNK])

    def report(name: str, index, build_s: float, size: int, **extra) -> None:
        timed = search_times(index, queries, single)
        result = {"build_s": round(build_s, 3), "bytes_per_vector": round(size / n, 2), **timed, **extra}
        result.update(recall(result.pop("rows"), exact, sources))
        entry["methods"][name] = result
        print(f"  {name:7s} {json.dumps(result)}", flush=True)

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    add(flat)
    build = time.perf_counter() - start
    _, exact = flat.search(queries, K)  # the ground truth
    faiss.write_index(flat, str(workdir / "flat.faiss"))
    if "flat" in args.methods:
        report("flat", flat, build, file_bytes(workdir / "flat.faiss"), factory="Flat")
    del flat
    (workdir / "flat.faiss").unlink()

    for name, preset in (("hnsw", "hnsw"), ("ivfpq", "ivfpq")):
        if name not in args.methods:
            continue
        start = time.perf_counter()
        index, factory = new_faiss_index(preset, n, args.dim, sample)
        add(index)
        build = time.perf_counter() - start
        file = workdir / f"{name}.faiss"
        faiss.write_index(index, str(file))
        extra = {"factory": factory}
        if name == "ivfpq":
            extra["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
        report(name, index, build, file_bytes(file), **extra)
        del index
        file.unlink()

    if "ondisk" in args.methods:
        folder = workdir / "ondisk.index"
        metadata = IndexMetadata(fingerprint="random-unit-vectors", dimension=args.dim, index_type="ivfpq")
        # Shard i holds a contiguous range of rows, given as blocks of at most CHUNK rows (views, not copies).
        bounds = np.linspace(0, n, args.shards + 1).astype(int)
        shards = [
            [vectors[begin : min(begin + CHUNK, last)] for begin in range(first, last, CHUNK)]
            for first, last in zip(bounds[:-1], bounds[1:])
        ]
        start = time.perf_counter()
        trained, metadata.factory = new_faiss_index("ivfpq", n, args.dim, sample)
        index = write_ondisk_index(trained, shards, [str(i) for i in range(n)], metadata, folder)
        build = time.perf_counter() - start
        del trained
        size = file_bytes(folder / INDEX_FILE, folder / IVFDATA_FILE)
        report("ondisk", index.faiss_index, build, size, factory=metadata.factory, shards=args.shards,
               nprobe=int(faiss.extract_index_ivf(index.faiss_index).nprobe),
               index_faiss_bytes=file_bytes(folder / INDEX_FILE), ivfdata_bytes=file_bytes(folder / IVFDATA_FILE))
        del index
        shutil.rmtree(folder)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="database sizes")
    parser.add_argument("--dim", type=int, default=576, help="vector dimension (default: SmolLM2-135M's 576)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per size (perturbed database vectors)")
    parser.add_argument("--single-queries", type=int, default=1000, help="of those, timed one query per call")
    parser.add_argument("--noise", type=float, default=0.5, help="norm of the noise added to a query's source")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--shards", type=int, default=4, help="shards of the on-disk build")
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: FAISS's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where index files are written (default: a temporary folder)")
    parser.add_argument("--output", default="eval/results/bench_index_scale.json")
    args = parser.parse_args()
    for name in ("dim", "queries", "single_queries", "shards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.sizes) < 2 * K:
        parser.error(f"--sizes must be at least {2 * K}, got {min(args.sizes)}")

    faiss = import_faiss()
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_available_bytes": available_memory(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dim": args.dim,
        "noise": args.noise,
        "seed": args.seed,
        "notes": [
            "vectors: random unit vectors; queries: database vectors plus Gaussian noise of norm ~noise, renormalised",
            "recall_at_10: share of the exact (flat) top 10 found; source_at_10: queries whose source is in the top 10",
            "beyond the source, the exact top 10 of random vectors are near ties that PQ does not separate",
            "ondisk: lists just written, so read from the page cache; a cold cache adds disk reads",
        ],
        "ivfpq_factories": {str(n): resolve_factory("ivfpq", n, args.dim) for n in args.sizes},
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_index_scale.", dir=args.workdir) as work:
        for n in args.sizes:
            memory, disk = needs(n, args.dim)
            available, free = available_memory(), shutil.disk_usage(work).free
            if available is not None and memory > available:
                reason = f"needs about {memory / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB available"
            elif disk > free:
                reason = f"needs about {disk / 2**30:.1f} GiB of disk in {work}, {free / 2**30:.1f} GiB free"
            else:
                reason = None
            if reason:
                print(f"n={n}: skipped, {reason}", flush=True)
                record["sizes"].append({"n": n, "skipped": reason})
                continue
            print(f"n={n}:", flush=True)
            record["sizes"].append(bench_size(n, args, Path(work)))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
