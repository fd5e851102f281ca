"""Training benchmarks, each a ratio measured in one run:

    python benchmarks/train_speed.py feed     --cache C   # step time fed by the store ÷ fed from memory
    python benchmarks/train_speed.py stream   --cache C   # stream rows/s ÷ a plain thread-pool decode
    python benchmarks/train_speed.py groups   --cache C   # wall time of --groups N ÷ --baseline
    python benchmarks/train_speed.py memory   --cache C   # peak RSS of training on C and on C doubled

"feed" trains the same SAE (same shape, batch and step code as `gsae train`) for the same number of
steps twice: once pulling batches from the store's prefetching stream, once from the same batches
already in memory; the two alternate and the best of each is kept.  By default the store-fed steps start
from a fresh stream (the window buffers made and first touched while they run, as at the start of a run);
``--after-epoch`` times them once the stream has handed out a whole epoch, as in a long run.

"stream" pulls batches from the training stream with nothing else running, and compares its rows/s with
a plain ``ThreadPoolExecutor`` (one thread per core) decoding the same (layer, chunk) pairs to scaled
float32 with the same torch conversion; the two alternate and the best of each is kept.  The ratio is
taken in the steady state training runs in: a stream that has already handed out one epoch (its window
buffers exist, the next window is decoding) hands out ``--epochs`` more, against the plain decode of the
pairs as many times.  The stream's first epoch (its start-up: nothing can be handed out before its
whole first window is decoded, into buffers it first has to fault in) is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gil_options import add_gil_options, apply_gil_options  # noqa: E402  (benchmarks/, the script's folder)
from pipeline.sae import SparseAutoencoder, default_lr  # noqa: E402
from pipeline.ranks import Ranks  # noqa: E402
from pipeline.train import make_optimizer, train_step  # noqa: E402
from pipeline.processes import start_processes, stop_processes, worker_nice, worker_threads  # noqa: E402
from stores import STORAGE_DTYPES, ActivationStore, compute_chunk_stats  # noqa: E402
from stores.chunk_files import ChunkProcesses  # noqa: E402
from stores.held_out import split_chunks  # noqa: E402
from stores.stream import TrainingStream  # noqa: E402


def feed(args) -> None:
    store = ActivationStore.open(args.cache)
    layers = list(range(args.first_layer, args.first_layer + args.group_size))
    _feed_ratio(store, layers, args, "")
    if args.s3:  # the same layers and chunks copied into moto's S3 server on loopback
        with _moto_bucket() as bucket:
            remote = _copy_store(store, layers, args.chunks, f"{bucket}/feed")
            _feed_ratio(remote, list(range(len(layers))), args, f"S3 (moto on loopback, {args.chunks} chunks) ")


def _feed_ratio(store: ActivationStore, layers: list[int], args, label: str) -> None:
    """Steps fed by the store's stream ÷ the same steps fed from batches already in memory."""
    scales = [float(1 / store.norm[l]) for l in layers]
    train_chunks, _ = split_chunks(store, 0.05)
    n_latents = int(store.d_model * args.expansion)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as gsae train does on CUDA

    def fresh():
        sae = SparseAutoencoder(store.d_model, n_latents, "topk", k=args.k).to(device)
        return (sae, make_optimizer(sae, default_lr(n_latents)),
                torch.zeros(n_latents, dtype=torch.long, device=device))

    def step(sae, opt, fired, x) -> None:  # as gsae train runs it: no host sync per step
        train_step(sae, opt, x, fired, 10**9, n_dead_hint=0, check_finite=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    threads = Ranks().decode_threads(store.path)
    nice = worker_nice(device, "reader") if args.worker_nice is None else args.worker_nice
    processes = _reader_processes(args, store, layers, device, threads, nice)
    pool = worker_threads(threads, "gsae-decode", nice)

    def new_stream() -> TrainingStream:  # as gsae train makes it: its decode threads (more for remote stores)
        return TrainingStream(store, layers, scales, train_chunks, args.batch_size, seed=0, device=device,
                              pool=pool, processes=processes)

    stream = new_stream()
    batches = [stream.next_batch().x.clone() for _ in range(args.steps)]
    stream.close()
    from_store, in_memory = [], []
    for _ in range(args.repeats):
        sae, opt, fired = fresh()
        stream = new_stream()
        step(sae, opt, fired, stream.next_batch().x)  # warm-up (first window decode)
        while args.after_epoch and stream.window < stream.windows_per_epoch:  # its buffers made and touched
            step(sae, opt, fired, stream.next_batch().x)
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(sae, opt, fired, stream.next_batch().x)
        sync()
        from_store.append((time.perf_counter() - start) / args.steps)
        stream.close()
        sae, opt, fired = fresh()
        step(sae, opt, fired, batches[0])
        sync()
        start = time.perf_counter()
        for x in batches:
            step(sae, opt, fired, x)
        sync()
        in_memory.append((time.perf_counter() - start) / args.steps)
    stop_processes(processes)
    pool.shutdown()
    print(f"{label}SAE {store.d_model}→{n_latents}, k={args.k}, batch {args.batch_size}, layers {layers}, "
          f"{args.steps} steps, on {device}, {threads} decode threads"
          f"{f' handing the chunks to {threads} processes' if processes is not None else ''}"
          f"{f' (at nice +{nice})' if nice else ''}"
          f"{f', timed after the stream has handed out one epoch ({stream.windows_per_epoch} windows)' if args.after_epoch else ', timed from a fresh stream'}")
    print(f"fed by the store   {1000 * min(from_store):8.1f} ms/step  (runs {', '.join(f'{1000 * t:.0f}' for t in from_store)})")
    print(f"fed from memory    {1000 * min(in_memory):8.1f} ms/step  (runs {', '.join(f'{1000 * t:.0f}' for t in in_memory)})")
    print(f"{label}ratio store / memory = {min(from_store) / min(in_memory):.3f}   (target <= 1.10)")


@contextlib.contextmanager
def _moto_bucket() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with dummy credentials in the environment: ``s3://bench``."""
    import s3fs

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from s3_local import start_moto

    server, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        yield "s3://bench"
    finally:
        server.stop()


def _copy_store(store: ActivationStore, layers: list[int], n_chunks: int, target: str) -> ActivationStore:
    """A store at ``target`` holding ``layers`` (renumbered from 0) for the first ``n_chunks`` chunks."""
    rows = store.readable_rows(n_chunks - 1)[1]
    copy = ActivationStore.create(target, n_layers=len(layers), d_model=store.d_model, n_tokens=rows,
                                  chunk_tokens=store.chunk_tokens, dtype=store.dtype,
                                  compression=store.attrs["codec"]["compression"])
    for chunk in range(n_chunks):
        start, stop = store.readable_rows(chunk)
        values = [store.read_rows(layer, start, stop) for layer in layers]
        copy.write_chunk(chunk, values, store.tokens(start, stop), compute_chunk_stats(values, store.dtype))
    copy.finalize()
    return ActivationStore.open(target)


def _reader_processes(args, store: ActivationStore, layers: list[int], device: torch.device,
                      threads: int, nice: int | None = None) -> ChunkProcesses | None:
    """The chunk processes `gsae train --reader args.reader` would decode with (None: threads)."""
    window = 8 * len(layers) * store.chunk_tokens * store.d_model * STORAGE_DTYPES[store.dtype][1]
    return start_processes(args.reader, "reader", store, device, 2 * window, threads, nice)


def stream_rate(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from stores.stream import as_tensor

    store = ActivationStore.open(args.cache)
    layers = list(range(args.first_layer, args.first_layer + args.group_size))
    scales = [float(1 / store.norm[l]) for l in layers]
    train_chunks, _ = split_chunks(store, 0.05)
    chunks = train_chunks[: args.chunks]
    rows = len(layers) * sum(b - a for a, b in map(store.readable_rows, chunks))
    cores = os.cpu_count() or 1

    def plain(threads: int = cores, convert: bool = True) -> float:
        # torch's float16 -> float32 conversion, as the stream's: numpy's is ~10x slower on this CPU and
        # would make the reference slow
        # (each thread decodes into a buffer of its own, as the stream decodes into its window: the
        # store's fastest read)
        local = threading.local()

        def decode(pair):
            layer, chunk = pair
            start, stop = store.readable_rows(chunk)
            out = getattr(local, "out", None)
            if out is None:
                out = local.out = np.empty((store.chunk_tokens, store.d_model), store.layer_array(layer).dtype)
            store.read_into(layer, start, stop, out[: stop - start])
            if not convert:  # the decode alone, as on a GPU, where the float16 rows are converted on the device
                return None
            return as_tensor(out[: stop - start], store.dtype).float().mul_(scales[layers.index(layer)])

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(decode, [(l, c) for _ in range(args.epochs) for l in layers for c in chunks]):
                pass
        return args.epochs * rows / (time.perf_counter() - start)

    def streamed() -> tuple[float, float]:
        """(rows/s of a fresh stream's first epoch, rows/s of the ``args.epochs`` after it)."""
        stream = TrainingStream(store, layers, scales, chunks, args.batch_size, seed=0, pool=pool, processes=processes)
        rates, handed = [], 0
        for epochs in (1, args.epochs):
            n_batches = (handed + epochs * rows) // args.batch_size - handed // args.batch_size
            start = time.perf_counter()
            for _ in range(n_batches):
                stream.next_batch()
            rates.append(n_batches * args.batch_size / (time.perf_counter() - start))
            handed += epochs * rows
        stream.close()
        return rates[0], rates[1]

    # the decode threads (or processes) as gsae train makes them on this device: one per core, at its priority
    nice = worker_nice(torch.device("cpu"), "reader") if args.worker_nice is None else args.worker_nice
    processes = _reader_processes(args, store, layers, torch.device("cpu"), cores, nice)
    pool = worker_threads(cores, "gsae-decode", nice)
    try:
        plain(), streamed()  # warm-up
        plains, colds, streams = [], [], []
        for _ in range(args.repeats):
            plains.append(plain())
            cold, warm = streamed()
            colds.append(cold)
            streams.append(warm)
    finally:
        stop_processes(processes)
        pool.shutdown()
    print(f"{len(layers)} layers × {len(chunks)} chunks = {rows:,} rows of d = {store.d_model}, batch {args.batch_size}, "
          f"{cores} cores, {args.epochs} epochs timed; the stream's decode "
          f"{'handed to ' + str(cores) + ' processes' if processes is not None else 'on its threads'}"
          f"{f' (at nice +{nice})' if nice else ''}")
    print(f"plain thread-pool decode to float32 {max(plains):12,.0f} rows/s  (runs {', '.join(f'{r:,.0f}' for r in plains)})")
    print(f"training stream                     {max(streams):12,.0f} rows/s  (runs {', '.join(f'{r:,.0f}' for r in streams)})")
    print(f"  its first epoch (start-up)        {max(colds):12,.0f} rows/s  (runs {', '.join(f'{r:,.0f}' for r in colds)})")
    print(f"ratio stream / plain decode = {max(streams) / max(plains):.3f}   (target >= 0.9)")
    # the best runs on both sides, as above, leave out the machine's worst moments; the medians keep them
    print(f"  ratio of the medians          = {float(np.median(streams)) / float(np.median(plains)):.3f}")
    if args.scaling:  # how the plain decode grows with threads: a GIL or memory-bound decode flattens early
        counts = sorted({1, 2, *range(4, cores + 1, 4), cores})
        rates = {t: max(plain(t) for _ in range(args.repeats)) for t in counts}
        print("plain decode by threads: " + ", ".join(f"{t}: {r:,.0f} rows/s ({r / rates[1]:.1f}×)" for t, r in rates.items()))
        # without the float32 conversion (torch's, itself threaded: 16 decode threads × its thread team may
        # oversubscribe the cores): does the decode alone keep scaling where the line above turns down?
        alone = {t: max(plain(t, convert=False) for _ in range(args.repeats)) for t in counts}
        print("decode alone by threads: " + ", ".join(f"{t}: {r:,.0f} rows/s ({r / alone[1]:.1f}×)" for t, r in alone.items()))


def _gsae(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def groups(args) -> None:
    store = ActivationStore.open(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--cache", args.cache, "--tokens", str(args.tokens), "--expansion", str(args.expansion),
                  "--batch-size", str(args.batch_size), "--checkpoint-every", "100000"]
        _gsae("group", "--cache", args.cache)  # the grouping --groups takes its partition from (reused if made)
        baseline = _gsae("train", *common, "--baseline", "--out", f"{tmp}/baseline")
        grouped = _gsae("train", *common, "--groups", str(args.groups), "--out", f"{tmp}/groups")
        per_sae = {name: json.load(open(f"{tmp}/{name}/summary.json"))["train_seconds"] for name in ("baseline", "groups")}
    n_layers = store.n_layers - 1
    print(f"{args.tokens:,} tokens per SAE, expansion {args.expansion}, batch {args.batch_size}")
    print(f"baseline ({n_layers} SAEs): {baseline:7.1f} s wall, {per_sae['baseline']:7.1f} s in training steps")
    print(f"groups ({args.groups} SAEs):   {grouped:7.1f} s wall, {per_sae['groups']:7.1f} s in training steps")
    print(f"ratio groups / baseline: wall {grouped / baseline:.3f}, steps {per_sae['groups'] / per_sae['baseline']:.3f}"
          f"   (target ≈ G/L = {args.groups}/{n_layers} = {args.groups / n_layers:.3f})")


def _doubled(cache: str, target: str) -> None:
    """A cache holding the source's rows twice (a synthetic cache of twice the size)."""
    source = ActivationStore.open(cache)
    store = ActivationStore.create(target, n_layers=source.n_layers, d_model=source.d_model,
                                   n_tokens=2 * source.n_tokens, chunk_tokens=source.chunk_tokens,
                                   dtype=source.dtype, attributes={k: v for k, v in source.attrs.items()
                                   if k not in {"n_layers", "d_model", "dtype", "codec", "chunk_tokens", "complete",
                                                "tokens_planned", "tokens_written", "chunks_written", "array_dtype"}})
    chunk = 0
    for _ in range(2):
        for c in range(source.n_chunks):
            start, stop = source.chunk_rows(c)
            if stop - start != source.chunk_tokens and store.chunk_rows(chunk)[1] - store.chunk_rows(chunk)[0] != stop - start:
                break  # a short last chunk only fits at the very end
            layers = [source.read_chunk(l, c) for l in range(source.n_layers)]
            store.write_chunk(chunk, layers, source.tokens(start, stop), compute_chunk_stats(layers, source.dtype))
            chunk += 1
    store.finalize()


def memory(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        doubled = os.path.join(tmp, "doubled")
        _doubled(args.cache, doubled)
        for cache in (args.cache, doubled):  # group first, so neither training run computes it
            _gsae("group", "--cache", cache)
        peaks = {}
        for name, cache in (("cache", args.cache), ("doubled", doubled)):
            code = (f"import sys, resource; sys.argv = ['gsae', 'train', '--cache', {cache!r}, '--out', {tmp + '/' + name!r},"
                    f" '--groups', '{args.groups}', '--tokens', '{args.tokens}', '--expansion', '{args.expansion}'];"
                    "import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            peaks[name] = int(out.stdout.split()[-1]) / 1024
        shutil.rmtree(doubled, ignore_errors=True)
    print(f"peak RSS training on the cache: {peaks['cache']:,.0f} MiB; on it doubled: {peaks['doubled']:,.0f} MiB "
          f"(growth {100 * (peaks['doubled'] / peaks['cache'] - 1):+.1f}%; target < 10%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["feed", "stream", "groups", "memory"])
    parser.add_argument("--cache", default="gsae-cache/smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=float, default=16)
    parser.add_argument("--k", type=int, default=96)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--first-layer", type=int, default=0)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--tmp", default=".")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="feed: where to train")
    parser.add_argument("--chunks", type=int, default=8, help="stream: training chunks to read per layer")
    parser.add_argument("--reader", choices=["auto", "threads", "processes"], default="auto",
                        help="feed, stream: who decodes the stream's chunks, as `gsae train --reader` (auto: processes "
                             "where the steps run on a GPU; `stream` runs on no GPU: threads unless told)")
    parser.add_argument("--epochs", type=int, default=3, help="stream: epochs timed after the first")
    parser.add_argument("--worker-nice", type=int, default=None,
                        help="feed, stream: the decode threads or processes lower their CPU priority by this much (default: "
                             "gsae train's, pipeline.processes.WORKER_NICE)")
    parser.add_argument("--after-epoch", action="store_true",
                        help="feed: time the store-fed steps once the stream has handed out a whole epoch (its window "
                             "buffers made and touched, as in a long run) rather than from a fresh stream")
    parser.add_argument("--scaling", action="store_true", help="stream: also the plain decode with 1, 2, 4, 8, ... threads")
    parser.add_argument("--s3", action="store_true", help="feed: also from a copy of --chunks chunks in moto's S3 "
                        "server on loopback (needs s3fs and moto: pip install -e '.[test]')")
    add_gil_options(parser)
    arguments = parser.parse_args()
    apply_gil_options(arguments)
    arguments.cache = os.path.abspath(arguments.cache)  # the subprocesses run from the repository root
    {"feed": feed, "stream": stream_rate, "groups": groups, "memory": memory}[arguments.what](arguments)
