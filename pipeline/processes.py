"""Threads or processes for the chunk files: `gsae cache --writer` and `gsae train --reader`.

Processes (:class:`stores.chunk_files.ChunkProcesses`) each have a GIL of their own, so the thread that
drives the GPU (the model's forward in `gsae cache`, the SAE steps in `gsae train`) does not wait for the
GIL behind the threads that compress or decode chunks.  They need what they read and write in shared
memory, chunk files gsae encodes itself, and, on a GPU, shared memory that CUDA can pin."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from pipeline.errors import GsaeError
from stores import ActivationStore, is_local
from stores.chunk_files import ChunkProcesses, SharedBuffers, lower_priority, shared_memory_room, usable_cores
from stores.pinned import can_pin_shared_memory


# What `auto` takes where processes can work, per option, from the H200 session of 2026-11-28 (code at
# 14c5971, docs/benchmarks.md): `gsae cache` took 2.81 and 2.69 s with 16 encoder processes against 2.12
# and 2.19 s with 16 and 8 writer threads (cache_throughput.py, 524k tokens), although the writer alone
# was faster in processes (5.39 against 4.55 GB/s into memory); the model's forward was as slow beside
# either (1.4-1.6 s against a bare 0.6 s).  The training stream's processes did better: stream ÷ plain
# decode 1.028 against 0.953, and the G=2 run's SAEs 600k and 909k tok/s against 577k and 836k.
AUTO_PROCESSES = {"writer": False, "reader": True}

# How much the threads and processes that compress or decode chunks lower their CPU priority where they
# work beside a thread driving a GPU.  That thread needs a core seldom but at once, to launch the next
# kernels; with 16 workers busy on 16 cores it waited for one.  On the H200 the cache's forward took
# 1.4-1.6 s against a bare 0.6 s beside 16 writer threads or processes alike, so not for the GIL alone
# (docs/benchmarks.md, 2026-11-28).  Here a thread of tiny torch ops beside 2 writers on 2 cores kept 0.40-0.49
# of its pace alone with processes, 0.36-0.44 with threads, and 0.80-0.82 and 0.64-0.68 with them at nice 10,
# which then wrote 0.88-0.99 GB/s against 1.10-1.21 (`cache_write.py --writer-only --threads 2 --probe
# --nice 10`, 2 runs each; the probe never waits, as a GPU's thread mostly does).
# Not yet measured on a GPU; `cache_throughput.py --worker-nice 0`, `train_speed.py feed --worker-nice 0`
# and `cache_write.py --nice` compare.
# On a CPU the reader's threads are lowered too: there the training thread itself gathers, converts and
# scales each batch from the decoded window, with torch's threads, while the decode of the next window
# runs; at nice +10 the stream alone handed out a median ~1.0M rows/s against ~0.87M (batches of 8,192 rows of
# d = 512 from 4 layers × 16 chunks, 2 threads, 5 runs of 4 each way, 2026-11-29), and a CPU `gsae train
# --baseline` (5 SAEs, 512 → 2048, its steps ~400× slower than the decode) took 57.0 and 55.0 s against 55.4 and 57.2.
# The writer stays at 0 on a CPU, where the model's forward is its peer and each waits for the other.
WORKER_NICE = 10


def worker_nice(device: torch.device, option: str) -> int:
    """How much the chunk workers of ``option`` ("writer": `gsae cache`; "reader": `gsae train`) lower
    their priority for work feeding ``device`` (:data:`WORKER_NICE`)."""
    return WORKER_NICE if device.type == "cuda" or option == "reader" else 0


def worker_threads(count: int, name: str, nice: int) -> ThreadPoolExecutor:
    """A pool of ``count`` threads named ``name``, each at a CPU priority lowered by ``nice``."""
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix=name, initializer=lower_priority,
                              initargs=(nice,))


def use_processes(requested: str, option: str, store: ActivationStore, device: torch.device, buffers_bytes: int) -> bool:
    """Whether ``--OPTION requested`` (one of :data:`~pipeline.requests.WORKER_KINDS`) takes processes for ``store``'s chunks, whose
    buffers take ``buffers_bytes``.  auto: where the work feeds a GPU, the machine has more than 2 cores and
    processes can work (a lossless cache on a local disk, room in /dev/shm, shared memory CUDA can pin),
    for the options where they were measured faster (:data:`AUTO_PROCESSES`: the reader); an explicit
    ``processes`` that cannot work is a one-line error."""
    if requested == "threads" or (requested == "auto" and not AUTO_PROCESSES.get(option, False)):
        return False  # (before the checks: pinning a block to see whether CUDA can starts the resource tracker)
    why = _cache_refusal(store)
    if not why and shared_memory_room() < buffers_bytes + buffers_bytes // 4:
        why = (f"needs {_mib(buffers_bytes)} of shared memory for its chunk buffers, and /dev/shm has "
               f"{_mib(shared_memory_room())} free")
    elif not why and device.type == "cuda" and not can_pin_shared_memory():
        why = "needs shared memory that CUDA can pin (cudaHostRegister failed here)"
    if requested == "processes":
        if why:
            raise GsaeError(f"--{option} processes {why}; pass --{option} threads")
        return True
    return not why and device.type == "cuda" and usable_cores() > 2


def _cache_refusal(store: ActivationStore) -> str:
    """Why chunk processes cannot work on ``store``'s chunks ('' where they can)."""
    if not is_local(store.path) or store.attrs.get("codec", {}).get("compression") != "lossless":
        return "needs a lossless cache on a local disk"
    return ""


def check_cache(requested: str, option: str, store: ActivationStore) -> None:
    """Refuse ``--OPTION processes`` for a cache they cannot work on, before anything is made for the command
    (the machine's checks, /dev/shm and pinning, come when they start: :func:`use_processes`)."""
    why = _cache_refusal(store) if requested == "processes" else ""
    if why:
        raise GsaeError(f"--{option} processes {why}; pass --{option} threads")


def start_processes(requested: str, option: str, store: ActivationStore, device: torch.device, buffers_bytes: int,
                    count: int, nice: int | None = None) -> ChunkProcesses | None:
    """``count`` chunk processes, with shared memory of their own, where :func:`use_processes` takes them;
    None where threads do the work.  Their priority is lowered by ``nice`` (default :func:`worker_nice`).
    Stop them with :func:`stop_processes`."""
    if not use_processes(requested, option, store, device, buffers_bytes):
        return None
    try:
        return ChunkProcesses(count, SharedBuffers(), worker_nice(device, option) if nice is None else nice)
    except OSError as exc:  # no interpreter to start (an embedded Python), or no processes left
        raise GsaeError(f"could not start the {option}'s processes ({exc}); pass --{option} threads") from None


def stop_processes(processes: ChunkProcesses | None) -> None:
    """Stop the chunk processes and let their shared memory go (after their users have closed; twice is fine)."""
    if processes is not None:
        processes.close()
        processes.shared.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
