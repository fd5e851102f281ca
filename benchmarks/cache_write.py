"""Cache write-only throughput: activations already in memory, compressed and written by gsae's chunk
writer with 1, 2 and all threads, beside a plain sequential write of the same raw bytes (the disk).

    python benchmarks/cache_write.py --cache gsae-cache/smollm2-135m --chunks 8
    python benchmarks/cache_write.py --layers 6 --d-model 512 --chunks 16        # no cache: Gaussian rows
    python benchmarks/cache_write.py --cache gsae-cache/smollm2-135m --chunks 4 --folder /dev/shm  # memory

With ``--cache``, real activations are read once (``--chunks`` chunks of every layer) and written again
into temporary stores with the cache's own codec; without it, Gaussian float16 rows of the given shape.
Each configuration writes the same chunks through ``pipeline.chunk_writer.ChunkWriter`` (the writer of
`gsae cache`: a job per layer's chunk, several chunks in flight, commits in order), timed from the first
chunk to the last commit.  Prints tok/s and GB/s of float16, the cores the process kept busy (CPU
seconds ÷ wall seconds: "1 thread" must stay near one core, or the ratio flatters) and the 2-thread ÷
1-thread ratio (target ≥ 1.7 on a 2-core CPU; ≥ 4 GB/s with all threads on the 16-core GPU machine).

The stores go under ``--folder`` (default: here, the disk).  ``--folder /dev/shm`` writes into memory
instead, which separates the writer's own scaling from what the file system's page cache costs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it (before torch starts)

import numcodecs.blosc  # noqa: E402
import numpy as np  # noqa: E402

import torch  # noqa: E402

from gil_options import add_gil_options, apply_gil_options  # noqa: E402  (benchmarks/, the script's folder)
from pipeline.capture import ChunkAssembler, ChunkBuffers  # noqa: E402
from pipeline.chunk_writer import Chunk, ChunkWriter  # noqa: E402
from stores import ActivationStore, ChunkStats, compute_chunk_stats  # noqa: E402
from stores.chunk_files import ChunkProcesses, SharedBuffers  # noqa: E402


def source_chunks(args: argparse.Namespace) -> tuple[list[Chunk], int, int, str, str]:
    """(chunks with every layer's rows, n_layers, d_model, dtype, compression) held in memory."""
    if args.cache:
        store = ActivationStore.open(args.cache)
        chunks = []
        for c in range(min(args.chunks, store.n_chunks)):
            start, stop = store.readable_rows(c)
            layers = np.stack([store.read_rows(layer, start, stop) for layer in range(store.n_layers)])
            chunks.append(Chunk(c, layers, store.tokens(start, stop), compute_chunk_stats(list(layers), store.dtype)))
        return chunks, store.n_layers, store.d_model, store.dtype, store.attrs["codec"]["compression"]
    rng = np.random.default_rng(0)
    rows = max(1, 4 * 2**20 // (args.d_model * 2))
    chunks = []
    for c in range(args.chunks):
        layers = rng.standard_normal((args.layers, rows, args.d_model), dtype=np.float32).astype(np.float16)
        chunks.append(Chunk(c, layers, np.zeros(rows, np.int32), compute_chunk_stats(list(layers), "float16")))
    return chunks, args.layers, args.d_model, "float16", "lossless"


def write_all(chunks: list[Chunk], n_layers: int, d_model: int, dtype: str, compression: str, threads: int,
              folder: str, encoder: ChunkProcesses | None = None, probe: bool = False,
              nice: int = 0) -> tuple[float, float, int, float]:
    """(wall seconds, CPU seconds of the whole process, bytes of memory first touched: minor page faults,
    the GIL probe's ops/s or 0) to write and commit every chunk into a fresh store with ``threads`` writer
    threads, or with ``encoder``'s processes, the chunks then in its shared memory (as `gsae cache --writer
    processes` writes).  ``probe``: :class:`GilProbe` runs meanwhile.  ``nice``: the writer threads' lowered
    priority (the processes' is the encoder's)."""
    rows = len(chunks[0].tokens)
    store = ActivationStore.create(os.path.join(folder, f"t{threads}"), n_layers=n_layers, d_model=d_model,
                                   n_tokens=rows * len(chunks), chunk_tokens=rows, dtype=dtype,
                                   compression=compression)
    writer = ChunkWriter(store, threads, 0.0, encoder=encoder, nice=nice)
    spinner = GilProbe() if probe else None
    cpu, faults = _cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    with spinner or contextlib.nullcontext():
        try:  # ChunkWriter.write_all, but the caller stops the processes (started once; the first run a warm-up)
            for chunk in chunks:
                writer.submit(chunk)
            writer.drain()
        finally:
            writer.pool.shutdown()
        seconds = time.perf_counter() - start
    fresh = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) * resource.getpagesize()
    return seconds, _cpu_seconds() - cpu, fresh, spinner.rate if spinner else 0.0


class GilProbe:
    """A thread that runs tiny torch ops back to back, as the model's thread does while it launches a GPU's
    kernels: each op lets go of the GIL and takes it back.  Its ops/s beside a writer, ÷ its ops/s alone,
    is the share of the model thread's pace that the writer leaves it (the writer's GIL, not its cores:
    give the probe a core of its own, e.g. 1 writer thread or process on 2 cores)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.count = 0
        self.rate = 0.0
        self.thread = threading.Thread(target=self._spin, name="gil-probe")

    def _spin(self) -> None:
        x = torch.zeros(16)
        n = 0
        while not self.stop.is_set():
            x.add_(1.0)
            x.mul_(0.5)
            n += 1
        self.count = n

    def __enter__(self) -> "GilProbe":
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.rate = self.count / (time.perf_counter() - self.started)

    @classmethod
    def alone(cls, seconds: float = 1.0) -> float:
        """Its ops/s with nothing else running."""
        with cls() as probe:
            time.sleep(seconds)
        return probe.rate


def in_shared_memory(chunks: list[Chunk], shared: SharedBuffers) -> list[Chunk]:
    """The chunks with their layers copied into ``shared`` (where `gsae cache --writer processes` keeps them)."""
    moved = []
    for chunk in chunks:
        layers = shared.empty(chunk.layers.shape, chunk.layers.dtype)
        layers[...] = chunk.layers
        moved.append(Chunk(chunk.index, layers, chunk.tokens, chunk.stats))
    return moved


def assemble_and_write(chunks: list[Chunk], n_layers: int, d_model: int, dtype: str, compression: str, threads: int,
                       folder: str, batch_rows: int, forward_ms: float = 0.0, stats: bool = True,
                       pending: int | None = None, buffers: ChunkBuffers | None = None) -> tuple[float, str]:
    """(wall seconds, where the rows came from) for the cache's host side without the model: batches of
    ``batch_rows`` rows, each block's rows handed to the cache's assembler as its forward hooks hand them
    over (from the GPU's memory where there is one: copied into the pinned chunk buffers, statistics on
    the GPU, as `gsae cache` does), the chunks then written as above.

    ``forward_ms``: before each batch the host waits that long with the GIL released, as `gsae cache`
    waits for a GPU's forward pass (``torch.cuda.synchronize``), so that what the writer does meanwhile
    shows; ``stats=False`` leaves the statistics out (where the GPU computes them, they cost the host
    nothing).  ``buffers``: the chunk buffers (pinned on a GPU) to reuse from one call to the
    next, as one long `gsae cache` run reuses them: their first allocation (about 0.4 GB pinned for this
    benchmark's 6 × 512 model, at the VM's fresh-memory cost) is then paid by the first repeat only."""
    rows = len(chunks[0].tokens)
    store = ActivationStore.create(os.path.join(folder, f"a{threads}"), n_layers=n_layers, d_model=d_model,
                                   n_tokens=rows * len(chunks), chunk_tokens=rows, dtype=dtype, compression=compression)
    values = np.concatenate([chunk.layers for chunk in chunks], axis=1)
    if dtype == "bfloat16":
        values = values.view(np.int16)
    tokens = np.concatenate([chunk.tokens for chunk in chunks])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = []
    for start in range(0, values.shape[1], batch_rows):
        layers = [torch.from_numpy(values[layer, start : start + batch_rows]).to(device) for layer in range(n_layers)]
        batches.append((start, layers, tokens[start : start + batch_rows]))
    # gsae keeps a batch's chunks in flight where the host waits for a GPU's forward; so here with CUDA,
    # or with the host idle as if it did
    writer = ChunkWriter(store, threads, 0.0, batch_rows=batch_rows if device.type == "cuda" or forward_ms else 0)
    writer.max_pending = pending or writer.max_pending
    pinned = device.type == "cuda"
    assembler = (ChunkAssembler(store, chunks[0].layers.dtype, pinned=pinned) if stats
                 else _KnownStats(store, chunks, pinned))
    if buffers is not None:
        assembler.buffers = buffers
    start = time.perf_counter()
    try:
        for row, layers, batch_tokens in batches:
            if forward_ms:
                time.sleep(forward_ms / 1000)
            for layer, rows_of_layer in enumerate(layers):  # as the forward hooks hand them over
                assembler.take(row, row + len(batch_tokens), layer, rows_of_layer)
            if device.type == "cuda":
                torch.cuda.synchronize()  # as the cache waits for the forward and its copies
            for item in assembler.add(row, batch_tokens):
                writer.submit(item)
        writer.drain()
    finally:
        writer.close()
    return time.perf_counter() - start, device.type


class _KnownStats(ChunkAssembler):
    """The cache's assembler with the statistics left out: each chunk gets those computed beforehand."""

    def __init__(self, store: ActivationStore, chunks: list[Chunk], pinned: bool):
        super().__init__(store, chunks[0].layers.dtype, pinned=pinned)
        self.known = {chunk.index: chunk.stats for chunk in chunks}

    def _add_stats(self, part, layer: int, rows: torch.Tensor) -> None:
        pass

    def _stats_of(self, chunk: int, part) -> ChunkStats:
        return self.known[chunk]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sequential_raw(chunks: list[Chunk], folder: str) -> float:
    """Seconds to write the same raw bytes to one file, uncompressed, with fsync: what the disk gives.

    The arrays are written from their own memory: a ``tobytes()`` copy per chunk (as this did until
    2026-11-27) put a copy into fresh memory inside the time.  Best of 2 here, 2 runs each: 1.16-1.39
    GB/s without it, 1.11-1.33 with it (within the noise)."""
    path = os.path.join(folder, "raw.bin")
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(np.ascontiguousarray(chunk.layers))
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - start


def parallel_raw(chunks: list[Chunk], folder: str, threads: int) -> float:
    """Seconds for ``threads`` threads to write the same raw bytes, a file per chunk and layer as the
    writer's jobs are, then fsync them: what the file system gives several writers."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[int, int]) -> None:
        c, layer = job
        with open(os.path.join(folder, f"raw-{c}-{layer}.bin"), "wb") as handle:
            handle.write(np.ascontiguousarray(chunks[c].layers[layer]))  # no copy: see sequential_raw
            handle.flush()
            os.fsync(handle.fileno())

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, [(c, layer) for c in range(len(chunks)) for layer in range(chunks[c].layers.shape[0])]))
    return time.perf_counter() - start


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the best is kept")
    parser.add_argument("--batch-rows", type=int, default=8192, help="rows per forward batch for the assembler line")
    parser.add_argument("--folder", default=".", help="where the stores are written (/dev/shm: memory)")
    parser.add_argument("--forward-ms", type=float, default=0.0,
                        help="also time the host side with the host idle this long per batch, as while a GPU runs "
                             "the forward pass (e.g. 37 for a Pythia-70M batch of 32 × 1024 on an H200)")
    parser.add_argument("--writer-pending", type=int, default=None,
                        help="also time the host side with this many chunks in flight (beside gsae's own rule)")
    parser.add_argument("--threads", default="1,2,all",
                        help="writer thread counts, comma-separated ('all': every core), e.g. 1,2,4,8,all")
    parser.add_argument("--writer-only", action="store_true",
                        help="only the gsae writer lines (no raw writes, no host side): e.g. under a profiler")
    parser.add_argument("--writers", default="threads,processes",
                        help="gsae's writer with threads, with encoder processes (`gsae cache --writer`), or both")
    parser.add_argument("--nice", type=int, default=0,
                        help="the writer's threads or processes lower their CPU priority by this much (gsae does "
                             "by pipeline.processes.WORKER_NICE beside a GPU); with --probe: the probe's pace")
    parser.add_argument("--probe", action="store_true",
                        help="run a GIL probe (tiny torch ops, as a model thread launching GPU kernels) beside each "
                             "writer line and print its pace ÷ its pace alone")
    add_gil_options(parser)
    args = parser.parse_args()
    apply_gil_options(args)
    # zarr turns blosc's own threads off (its codec sets this on import); were they on, "1 thread"
    # would compress on every core and the ratio would mean nothing
    assert numcodecs.blosc.use_threads is False, "blosc's internal threads are on"

    chunks, n_layers, d_model, dtype, compression = source_chunks(args)
    tokens = sum(len(c.tokens) for c in chunks)
    gigabytes = sum(c.layers.nbytes for c in chunks) / 1e9
    cores = os.cpu_count() or 1
    print(f"{len(chunks)} chunks × {n_layers} layers × {len(chunks[0].tokens):,} rows × {d_model} "
          f"({dtype}, {compression}): {tokens:,} tokens, {gigabytes:.2f} GB raw; {cores} cores")
    results = {}
    counts = {cores if t == "all" else int(t) for t in args.threads.split(",")}
    counts = sorted(counts if args.writer_only else counts | {cores})  # the host-side lines compare with all cores
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        if not args.writer_only:
            disk = min(sequential_raw(chunks, folder) for _ in range(args.repeats))
            print(f"sequential raw write  {tokens / disk:12,.0f} tok/s  {gigabytes / disk:6.2f} GB/s   (into {args.folder})")
            with tempfile.TemporaryDirectory(dir=folder) as raw_folder:
                several = min(parallel_raw(chunks, raw_folder, cores) for _ in range(args.repeats))
            print(f"raw write, {cores:2d} thr    {tokens / several:12,.0f} tok/s  {gigabytes / several:6.2f} GB/s   "
                  f"(a file per chunk and layer, as the writer's jobs)")
        with tempfile.TemporaryDirectory(dir=folder) as run_folder:  # warm-up: codecs, zarr's event loop
            write_all(chunks[:1], n_layers, d_model, dtype, compression, cores, run_folder)
        kinds = [kind.strip() for kind in args.writers.split(",")]
        shared = SharedBuffers() if "processes" in kinds else None
        in_shared = in_shared_memory(chunks, shared) if shared else []
        alone = GilProbe.alone() if args.probe else 0.0
        if alone:
            print(f"GIL probe alone       {alone:12,.0f} ops/s")
        try:
            for threads in counts:
                for kind in kinds:
                    processes = kind == "processes"
                    # started once, as `gsae cache` starts them (about 0.2 s); a first run maps the chunks in each
                    encoder = ChunkProcesses(threads, shared, args.nice) if processes else None
                    run = functools.partial(write_all, in_shared if processes else chunks, n_layers, d_model, dtype,
                                            compression, threads, encoder=encoder, probe=args.probe, nice=args.nice)
                    try:
                        if encoder is not None:
                            encoder.wait_ready()
                            with tempfile.TemporaryDirectory(dir=folder) as run_folder:
                                run(run_folder)
                        with tempfile.TemporaryDirectory(dir=folder) as run_folder:
                            seconds, cpu, fresh, rate = min(run(run_folder) for _ in range(args.repeats))
                    finally:
                        if encoder is not None:
                            encoder.close()
                    results[threads, kind] = seconds
                    probe = f"  GIL probe at {rate / alone:.2f} of alone" if alone else ""
                    print(f"gsae writer {threads:2d} {'proc' if processes else 'thr '}  {tokens / seconds:10,.0f} tok/s  "
                          f"{gigabytes / seconds:6.2f} GB/s  {cpu / seconds:4.2f} cores busy in this process{probe}")
        finally:
            if shared:
                shared.close()
        results.update({threads: seconds for (threads, kind), seconds in results.items() if kind == kinds[0]})
        for pending in [] if args.writer_only else [None] + ([args.writer_pending] if args.writer_pending else []):
            # reused by every run of this pass, and unpinned after it (pinned with cudaHostRegister on a GPU)
            buffers = ChunkBuffers((n_layers, len(chunks[0].tokens), d_model), chunks[0].layers.dtype,
                                    torch.cuda.is_available())
            try:
                host_side = functools.partial(assemble_and_write, chunks, n_layers, d_model, dtype, compression, cores,
                                              batch_rows=args.batch_rows, pending=pending, buffers=buffers)
                in_flight = f"{pending} chunks in flight" if pending else "gsae's chunks in flight"
                with tempfile.TemporaryDirectory(dir=folder) as run_folder:
                    faults = _minor_faults()
                    host, where = min(host_side(run_folder) for _ in range(args.repeats))
                    host_fresh = (_minor_faults() - faults) * resource.getpagesize() / args.repeats
                print(f"assembler + writer {cores:2d} thr {tokens / host:10,.0f} tok/s  {gigabytes / host:6.2f} GB/s   (the "
                      f"cache's host side: batches of {args.batch_rows:,} rows from {where}, {in_flight}); ÷ writer alone = "
                      f"{results[cores] / host:.2f}; fresh memory {host_fresh / (gigabytes * 1e9):.2f} × the bytes")
                if args.forward_ms:
                    # statistics where a GPU computes them (on the device), left out on a CPU: they would be host
                    # work that a GPU run does not have
                    n_batches = -(-tokens // args.batch_rows)
                    gaps = n_batches * args.forward_ms / 1000
                    with tempfile.TemporaryDirectory(dir=folder) as run_folder:
                        overlapped, _ = min(host_side(run_folder, forward_ms=args.forward_ms, stats=where == "cuda")
                                            for _ in range(args.repeats))
                    ideal = max(results[cores], gaps)
                    print(f"  + host idle {args.forward_ms:g} ms a batch {tokens / overlapped:8,.0f} tok/s   ({n_batches} "
                          f"batches: {gaps:.2f} s idle, writer alone {results[cores]:.2f} s, this {overlapped:.2f} s); "
                          f"max(writer, idle) ÷ this = {ideal / overlapped:.2f} (1: the writer works while the GPU runs)")
            finally:
                buffers.close()
    print(f"fresh memory touched while writing: {fresh / (gigabytes * 1e9):.2f} × the float16 bytes (minor page "
          f"faults; dear where memory is backed lazily, as in the GPU machine's VM)")
    for kind in kinds:
        unit = "processes" if kind == "processes" else "threads"
        if (1, kind) in results and (2, kind) in results:
            print(f"ratio 2 {unit} / 1 = {results[1, kind] / results[2, kind]:.2f}   (target >= 1.7)")
        if (cores, kind) in results:
            print(f"all {cores} {unit}: {gigabytes / results[cores, kind]:.2f} GB/s of float16 (target on the GPU "
                  f"machine >= 4)")


if __name__ == "__main__":
    main()
