"""Cache throughput ÷ bare forward throughput, same model, windows and batch, in one run.

    python benchmarks/cache_throughput.py [--model M] [--tokens N] [--batch-size B] [--folder /dev/shm]

"bare forward" runs the same base model (all blocks, no LM head) on the same windows with no hooks
and nothing stored; "cache" is gsae's stage-one loop (hooks, float16 conversion, chunk statistics,
shuffle+zstd+crc32c compression and writing on a pool of writer threads) into a temporary store.
The two are measured alternately (bare, cache, bare) and the bare figure is their mean.

"write-only" then writes the chunks the cache just wrote (read back into memory, at most
``--write-only-gib``), with the same writer and threads, into a fresh store beside it: gsae's writer
with no model running.  The ratio cache ÷ min(bare forward, write-only) is the GPU target of
../shared/DESIGN.md (≥ 0.8); on a CPU the target is cache ÷ bare forward ≥ 0.95.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it (see cli.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from cache_write import in_shared_memory  # noqa: E402  (benchmarks/, the script's folder)
from gil_options import add_gil_options, apply_gil_options  # noqa: E402
from pipeline.cache import fill_store  # noqa: E402
from pipeline.requests import WORKER_KINDS  # noqa: E402
from pipeline.chunk_writer import Chunk, ChunkWriter  # noqa: E402
from pipeline.corpus import iter_windows, open_corpus, window_plan  # noqa: E402
from pipeline.models import load_model, pick_device, resolve_model_spec  # noqa: E402
from pipeline.ranks import Ranks  # noqa: E402
from stores import ActivationStore, compute_chunk_stats, default_chunk_tokens  # noqa: E402
from stores.chunk_files import ChunkProcesses, SharedBuffers  # noqa: E402


def bare_forward(lm, windows: list[list[int]], batch: int) -> float:
    """Tokens per second of the plain forward pass over ``windows`` (rows as stored: BOS dropped).  On a GPU
    the clock stops once the last forward has run (not when it is queued: that overstated the bare forward by
    a batch, about 6% at 16 batches, and so understated every ratio to it)."""
    def synchronize() -> None:
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)

    synchronize()
    start = time.perf_counter()
    rows = 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i : i + batch], device=lm.device)
            lm.model.base_model(input_ids=ids, use_cache=False)
            rows += ids.shape[0] * (ids.shape[1] - 1)
    synchronize()
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--compression", default="lossless")
    parser.add_argument("--folder", default=".", help="where the temporary store goes (/dev/shm: memory, not the disk)")
    parser.add_argument("--write-threads", type=int, default=None,
                        help="writer threads for both runs (default: gsae cache's, a thread per core)")
    parser.add_argument("--writer", choices=WORKER_KINDS, default="auto",
                        help="gsae cache --writer for both runs: threads, encoder processes, or gsae's choice")
    parser.add_argument("--write-only-gib", type=float, default=4.0,
                        help="at most this many GiB of the cached chunks are held in memory for the write-only run")
    parser.add_argument("--worker-nice", type=int, default=None,
                        help="the writer's threads or processes lower their CPU priority by this much (default: "
                             "gsae's, pipeline.processes.WORKER_NICE beside a GPU, 0 on a CPU)")
    parser.add_argument("--no-buffers-ahead", dest="buffers_ahead", action="store_false",
                        help="make the pinned chunk buffers in the hooks as they are needed, as before, not on a "
                             "thread of their own while the first batches run (gsae's default, on a GPU only)")
    add_gil_options(parser)
    args = parser.parse_args()
    apply_gil_options(args)
    threads = args.write_threads or Ranks().threads()

    console = Console(stderr=True)
    lm = load_model(resolve_model_spec(args.model), pick_device("auto"))
    plan = window_plan(lm.tokenizer, args.context_length, None)
    first_row = 1 if plan.bos_token_id is not None else 0
    rows_per_window = args.context_length - first_row
    n_windows = -(-args.tokens // rows_per_window)
    n_windows = -(-n_windows // args.batch_size) * args.batch_size  # whole batches in both loops
    windows = list(itertools.islice(iter_windows(open_corpus(args.dataset), lm.tokenizer, plan), n_windows))
    tokens = len(windows) * rows_per_window
    bare_forward(lm, windows[: args.batch_size], args.batch_size)  # warm-up

    bare_before = bare_forward(lm, windows, args.batch_size)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        store = ActivationStore.create(
            os.path.join(tmp, "cache"), n_layers=lm.n_layers, d_model=lm.d_model, n_tokens=tokens,
            chunk_tokens=default_chunk_tokens(lm.d_model, "float16"), compression=args.compression,
        )
        faults = _minor_faults()
        start = time.perf_counter()
        result = fill_store(store, lm, iter(windows), batch_size=args.batch_size, first_row=first_row,
                            rows_per_window=rows_per_window, console=console, write_threads=threads,
                            writer_kind=args.writer, worker_nice_by=args.worker_nice,
                            buffers_ahead=args.buffers_ahead)
        seconds = time.perf_counter() - start
        cached = tokens / seconds
        fresh = (_minor_faults() - faults) * resource.getpagesize() / tokens
        bytes_per_value = store.nbytes_on_disk("layers") / (tokens * lm.n_layers * lm.d_model)
        written = write_only(ActivationStore.open(store.path), os.path.join(tmp, "write-only"), threads,
                             int(args.write_only_gib * 2**30), processes="process" in result.writer)
    faults = _minor_faults()
    bare_after = bare_forward(lm, windows, args.batch_size)
    fresh_bare = (_minor_faults() - faults) * resource.getpagesize() / tokens
    bare = (bare_before + bare_after) / 2

    print(f"model {lm.spec.model_id}  layers {lm.n_layers}  d_model {lm.d_model}  tokens {tokens:,}  "
          f"batch {args.batch_size}x{args.context_length}  threads {torch.get_num_threads()}")
    print(f"bare forward   {bare:8.1f} tok/s  (before {bare_before:.1f}, after {bare_after:.1f})")
    print(f"cache          {cached:8.1f} tok/s  ({args.compression}, {bytes_per_value:.3f} bytes/value in layers/)")
    print(f"write-only     {written:8.1f} tok/s  (gsae's writer alone, {result.writer}, the same chunks, "
          f"{2 * lm.n_layers * lm.d_model * written / 1e9:.2f} GB/s of float16)")
    print(f"ratio cache / bare forward = {cached / bare:.3f}   (target on a CPU >= 0.95)")
    print(f"ratio cache / min(bare forward, write-only) = {cached / min(bare, written):.3f}   (target on a GPU >= 0.8)")
    steady = steady_pace(result.timeline)
    if steady:
        print(f"ratio cache in its second half / min(bare forward, write-only) = {steady / min(bare, written):.3f}   "
              f"({steady:,.0f} tok/s: the batches after half the rows, without the start-up (buffers, pools) and "
              f"the writer's last chunks)")
    phases = result.phases
    print(f"cache's {seconds:.2f} s by phase: forward with hooks and copies {phases['forward']:.2f} s (bare: "
          f"{tokens / bare:.2f} s), making and letting go of the chunk buffers {phases['buffers']:.2f} s, waiting for the writer "
          f"{phases['writer_wait']:.2f} s, windows {phases['windows']:.2f} s, the rest "
          f"{seconds - sum(phases.values()):.2f} s")
    print(f"fresh memory touched per token, counted as minor page faults: cache {fresh / 1024:.1f} KiB, bare forward "
          f"{fresh_bare / 1024:.1f} KiB; the difference is {(fresh - fresh_bare) / (2 * lm.n_layers * lm.d_model):.2f} × "
          f"the float16 activations")


def write_only(cache: ActivationStore, folder: str, threads: int, max_bytes: int, processes: bool = False) -> float:
    """Tokens per second of gsae's chunk writer (``threads`` threads, or as many encoder processes, started
    before the clock as `gsae cache` starts them before its first chunk) writing ``cache``'s whole chunks, read
    back into memory first (shared memory for the processes; at most ``max_bytes`` of them), into a fresh
    store at ``folder``."""
    chunk_bytes = cache.n_layers * cache.chunk_tokens * cache.d_model * 2
    n_chunks = max(1, min(cache.tokens_written // cache.chunk_tokens, max_bytes // chunk_bytes))
    chunks = []
    for c in range(n_chunks):
        start, stop = cache.readable_rows(c)
        layers = np.stack([cache.read_rows(layer, start, stop) for layer in range(cache.n_layers)])
        # statistics made here, not timed: in gsae cache they are made where the model runs, not by the writer
        chunks.append(Chunk(c, layers, cache.tokens(start, stop), compute_chunk_stats(list(layers), cache.dtype)))
    target = ActivationStore.create(folder, n_layers=cache.n_layers, d_model=cache.d_model,
                                    n_tokens=n_chunks * cache.chunk_tokens, chunk_tokens=cache.chunk_tokens,
                                    dtype=cache.dtype, compression=cache.attrs["codec"]["compression"])
    shared = SharedBuffers() if processes else None
    try:
        encoder = None
        if shared is not None:
            chunks = in_shared_memory(chunks, shared)
            encoder = ChunkProcesses(threads, shared)
            encoder.wait_ready()
        start = time.perf_counter()
        ChunkWriter(target, threads, 0.0, encoder=encoder).write_all(chunks)  # stops the processes too
        return n_chunks * cache.chunk_tokens / (time.perf_counter() - start)
    finally:
        if shared is not None:
            shared.close()


def steady_pace(timeline: list[tuple[float, int]]) -> float | None:
    """Rows per second between the first batch that ends past half the rows and the last batch (None
    with fewer than 4 batches): the cache's pace once its buffers exist and its pools run."""
    if len(timeline) < 4:
        return None
    half = next(i for i, (_, rows) in enumerate(timeline) if rows >= timeline[-1][1] / 2)
    (t0, r0), (t1, r1) = timeline[min(half, len(timeline) - 2)], timeline[-1]
    return (r1 - r0) / (t1 - t0) if t1 > t0 else None


def _minor_faults() -> int:
    """Pages first touched by this process so far.  Where first touches are dear (the GPU machine's VM
    backs memory lazily: a plain write into /dev/shm ran at 1.4 GB/s there) they bound the cache."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


if __name__ == "__main__":
    main()
