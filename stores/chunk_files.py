"""Whole chunk files, written and read as zarr does, by threads or by processes of their own.

A chunk file of a local array whose codecs are bytes → blosc or zstd → crc32c is the codec's output
followed by its CRC32C, little-endian, renamed into place from a temporary file.  gsae writes and decodes
such files itself (``stores.chunk_io._encode_chunk_file`` and ``_decode_chunk_file``; why
there): on the writer's or the stream's threads, or, with :class:`ChunkProcesses`, in processes of their
own (`gsae cache --writer`, `gsae train --reader`).

Why processes: every thread of the writer takes the GIL between its C calls (the job's Python, numcodecs'
copy of the compressed bytes, the file calls), and on the H200 machine the model's thread ran its
forward at a third of its speed beside 16 writer threads (docs/benchmarks.md); the training stream's
decode threads delivered 1.4M rows/s beside the training loop, against 2.56M alone.  A process has its own
GIL: the parent only pickles each job's few arguments and reads its answer, and the activations stay
where they are, in shared memory (:class:`SharedBuffers`) that the processes map.  On the development
machine (2 cores; py-spy --gil over benchmarks/cache_write.py --writer-only --threads 2, the same bytes)
the writer's threads held the GIL for 215 samples (500 Hz), the parent's threads that feed 2 processes for 29.

This module imports no torch and no zarr: each process starts in about 0.2 s.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import math
import mmap
import os
import pickle
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import Future
from multiprocessing import shared_memory
from typing import Any, BinaryIO, Callable

import crc32c
import numpy as np


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux, where a thread has a nice value of its
    own; elsewhere, or where refused, nothing).  For the threads and processes that compress or decode chunks
    beside a thread driving a GPU, which needs a core seldom but at once (see pipeline.processes)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))


def usable_cores() -> int:
    """The cores this process may use: those it may run on (its CPU affinity: cpusets, taskset), at most its
    CPU quota rounded up (cgroups: `docker --cpus`, Kubernetes limits, SLURM).  A container given 4 CPUs of
    a 64-core host otherwise started 64 writer and decode threads."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the cores this process may run on
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> float | None:
    """CPUs this process's cgroup may use (quota ÷ period), the smallest over the cgroup and its ancestors,
    cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``); None where there is no quota or no cgroup file."""
    try:
        with open(membership) as handle:
            lines = handle.read().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        names = controllers.split(",") if controllers else []
        if controllers == "":  # v2: one unified hierarchy
            folders = [root]
        elif "cpu" in names:  # v1: the cpu controller's hierarchy (mounted as cpu or cpu,cpuacct)
            folders = [os.path.join(root, controllers), os.path.join(root, "cpu")]
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for folder in dict.fromkeys(folders):
            for depth in range(len(parts), -1, -1):  # the cgroup, then each ancestor (a namespace shows "/")
                quota = _read_quota(os.path.join(folder, *parts[:depth]))
                if quota is not None:
                    found.append(quota)
    return min(found) if found else None


def _read_quota(folder: str) -> float | None:
    try:  # v2: "max 100000" or "200000 100000"
        with open(os.path.join(folder, "cpu.max")) as handle:
            quota, period = handle.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1: -1 is no quota
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as handle:
            quota = int(handle.read())
        with open(os.path.join(folder, "cpu.cfs_period_us")) as handle:
            period = int(handle.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


#: Whether :func:`chunk_checksum` lets go of the GIL while it runs: where this process has more than two
#: cores (the writer and decode pools have a thread per core).  Measured:
#: - H200 machine, 16 cores, 16 threads compressing (blosc into reused buffers) and checksumming
#:   4096 × 512 float16 chunks (benchmarks/compress_threads.py, 2026-11-28): 4.67 GB/s on 8.0 cores busy
#:   with the checksum holding the GIL (google_crc32c), 8.10 GB/s on 14.3 cores with it released; 5.23
#:   against 4.29 with 8 threads.  numcodecs' encode (the writer's) with google_crc32c: 4.87 GB/s on 8.7
#:   cores; with the released checksum it is still to be measured there.
#: - this 2-core machine, 2 threads: releasing it made the stream's decode 5-10% slower (each release
#:   is a GIL handoff to win back); the writer was 1-7% faster.  docs/benchmarks.md, "Where the writer
#:   threads hold the GIL".
#: A chunk process runs one job at a time: it holds the GIL (nothing there to hand it to).
CHECKSUM_RELEASES_GIL = usable_cores() > 2


def chunk_checksum(payload: Any) -> int:
    """CRC32C of a chunk's encoded bytes (a numpy array or other buffer): the value zarr's crc32c codec
    appends, little-endian, to each chunk file (zarr ≥ 3.1.4 computes it with google_crc32c; the crc32c
    package gives the same values and, unlike google_crc32c, can release the GIL: :data:`CHECKSUM_RELEASES_GIL`)."""
    return crc32c.crc32c(payload, gil_release_mode=1 if CHECKSUM_RELEASES_GIL else 0)


def write_chunk_file(path: str, codec: Any, values: np.ndarray) -> None:
    """``values`` encoded by the numcodecs ``codec`` (blosc or zstd over the raw little-endian bytes, what
    zarr's bytes codec hands it), then the CRC32C of that, written to a temporary file renamed to ``path``:
    the bytes zarr writes for one whole chunk, never half a file under ``path``."""
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    encoded = np.frombuffer(codec.encode(raw), dtype=np.uint8)
    checksum = np.uint32(chunk_checksum(encoded)).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_whole(path, f"{path}.{uuid.uuid4().hex}.partial", encoded, checksum)


def replace_whole(path: str, temporary: str, *parts: Any) -> None:
    """Write ``parts`` (bytes-like) to ``temporary``, a name of this writer's own, and rename it to ``path``:
    a kill leaves the old file or the new one, never half of one; a failure removes the temporary."""
    try:
        with open(temporary, "wb") as handle:
            for part in parts:
                handle.write(part)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def has_nonzero_byte(values: np.ndarray) -> bool:
    """Whether ``values`` differ from the fill value 0 anywhere: a non-zero byte in the first 4 KiB (2 µs)
    settles it for activations; only an all-zero start is scanned whole (zarr's own test, ``.view("V2")``
    comparisons, took 2.7 ms per 4 MiB chunk with the GIL held)."""
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    return bool(raw[:4096].any() or raw.any())


def write_or_remove_chunk_file(path: str, codec: Any, values: np.ndarray) -> None:
    """What zarr does with one whole chunk of an array whose fill value is 0 and which does not write
    empty chunks: write it (:func:`write_chunk_file`), or, where every byte is 0, remove its file."""
    if has_nonzero_byte(values):
        write_chunk_file(path, codec, values)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_read_buffers = threading.local()  # each decoding thread's reused buffer for compressed chunk files


def read_chunk_file(path: str, out: np.ndarray) -> bool:
    """Decode one blosc chunk file (:func:`write_chunk_file`'s) straight into ``out``, checksum checked, the
    file read into a reused per-thread buffer.  False if the file is absent (zarr then reads the fill
    value).  A damaged file raises (ValueError, or OSError for a failed read)."""
    import numcodecs.blosc

    try:
        handle = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # what zarr's LocalStore reads as absent
        return False
    with handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = getattr(_read_buffers, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = _read_buffers.buffer = bytearray(max(size, 1 << 22))
        view = memoryview(buffer)[:size]
        if handle.readinto(view) != size:
            raise OSError(errno.EIO, f"short read of {path}")
    if size < 4:
        raise ValueError(f"a chunk file of {size} bytes has no checksum")
    payload = np.frombuffer(buffer, dtype=np.uint8, count=size - 4)
    if chunk_checksum(payload) != int.from_bytes(view[-4:], "little"):
        raise ValueError("Stored and computed checksum do not match")
    # blosc fills only what the chunk holds: one of another size would leave stale rows in ``out``
    # (bytes 4-8 of blosc's header: the uncompressed size)
    if size < 20 or int.from_bytes(view[4:8], "little") != out.nbytes:
        raise ValueError(f"the chunk decodes to {int.from_bytes(view[4:8], 'little') if size >= 20 else 0:,} bytes, "
                         f"not the {out.nbytes:,} of a chunk")
    numcodecs.blosc.decompress(payload, out)
    return True


_SHM_FOLDER = "/dev/shm"  # where Linux keeps POSIX shared memory: the processes map a block by its path there
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux's madvise advice (5.14+; Python 3.11 has no names)


def shared_memory_room() -> int:
    """Bytes free for shared memory (0 where there is no /dev/shm: not Linux).  Containers often give
    /dev/shm 64 MiB, and writing past its end kills the process (SIGBUS): check before relying on it."""
    try:
        stats = os.statvfs(_SHM_FOLDER)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


class SharedBuffers:
    """numpy arrays in POSIX shared memory, which :class:`ChunkProcesses` read and write where they are.

    Each array is a block of its own, made with :class:`multiprocessing.shared_memory.SharedMemory`
    (so Python's resource tracker removes the blocks of a killed process) and mapped here a second
    time, so the arrays do not hold SharedMemory's own buffer (closing that with arrays alive raises)."""

    def __init__(self) -> None:
        # (address, bytes, name, mapping): the mapping held here, so that no other block can be mapped at
        # its address while it is known (an array's mapping goes with the array's last reference)
        self._blocks: list[tuple[int, int, str, mmap.mmap]] = []
        self._memories: list[shared_memory.SharedMemory] = []

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new C-contiguous array in a block of its own (page-aligned, as cudaHostRegister needs)."""
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        memory = shared_memory.SharedMemory(create=True, size=nbytes)
        self._memories.append(memory)
        memory.close()  # its own mapping; ours below stays
        fd = os.open(os.path.join(_SHM_FOLDER, memory.name), os.O_RDWR)
        try:
            # the pages now: a /dev/shm that fills up later is ENOSPC here, not a SIGBUS at the first write
            os.posix_fallocate(fd, 0, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except OSError:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                memory.unlink()
            self._memories.remove(memory)
            raise
        os.close(fd)
        array = np.frombuffer(mapping, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        self._blocks.append((array.__array_interface__["data"][0], nbytes, memory.name, mapping))
        return array

    def locate(self, values: np.ndarray) -> tuple[str, int] | None:
        """(block name, byte offset) of C-contiguous ``values`` lying inside one of these blocks, else None."""
        if not values.flags.c_contiguous:
            return None
        address = values.__array_interface__["data"][0]
        for start, nbytes, name, _ in self._blocks:
            if start <= address and address + values.nbytes <= start + nbytes:
                return name, address - start
        return None

    def release(self, values: np.ndarray) -> None:
        """Forget the block of an array made by :meth:`empty` and remove its name (its memory goes once
        no array and no process maps it)."""
        where = self.locate(values)
        if where is None:
            return
        self._blocks = [block for block in self._blocks if block[2] != where[0]]
        for memory in [m for m in self._memories if m.name == where[0]]:
            self._memories.remove(memory)
            with contextlib.suppress(FileNotFoundError):
                memory.unlink()

    def close(self) -> None:
        """Remove the blocks' names (their memory goes once no array and no process maps it)."""
        for memory in self._memories:
            with contextlib.suppress(FileNotFoundError):
                memory.unlink()
        self._memories.clear()
        self._blocks.clear()


class ProcessStopped(OSError):
    """A job whose chunk process is gone: the process, not the cache (one line, never "run gsae verify")."""


def _stopped(message: str) -> OSError:
    """The error of a job whose process is gone: an OSError, which the store reports in one line."""
    return ProcessStopped(errno.EIO, message)


class ChunkProcesses:
    """Worker processes that write whole chunk files (:func:`write_or_remove_chunk_file`) or decode them
    into shared memory (:func:`read_chunk_file`).

    Each is a plain ``python -c`` child fed pickled jobs on a pipe (pickle only over these anonymous pipes
    between this process and the children it started, as multiprocessing does; nothing read from a file
    or the network is unpickled): multiprocessing's pools start their
    workers through the parent's main module, which for `gsae` imports torch and transformers (1.8 s here,
    against 0.2 s for this module).  A job names its values, or a decode's target, by shared-memory block
    and offset in ``shared``: it carries no array (an array over the pipe's 64 KiB, such as a 32 × 4096
    model's 1 MiB chunk statistics, would block the sender until the process read it).  Jobs wait in one
    queue here and go to a process when it has fewer than :data:`_DEPTH` (as a thread pool's threads take
    the next job when free: with jobs dealt out at submission, 2 processes wrote 1.20 GB/s where 2 threads
    wrote 1.74); the thread reading a process's answers settles the futures and sends it the next job.
    The processes ignore Ctrl-C (the parent stops them) and exit when their pipe closes, also when the
    parent is killed."""

    _DEPTH = 2  # jobs sent to a process at once: one running, the next already in its pipe

    def __init__(self, processes: int, shared: SharedBuffers, nice: int = 0):
        """``nice``: each process lowers its CPU priority by that much (:func:`lower_priority`)."""
        self.shared, self.processes = shared, max(1, processes)
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Future, tuple]] = collections.deque()
        self._workers: list[_Worker] = []
        try:
            for index in range(self.processes):
                self._workers.append(_Worker(index, self._dispatch, nice))
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Return once every process has started (about 0.2 s; jobs sent before then wait in its pipe)."""
        for worker in self._workers:
            worker.ready.wait()

    def write(self, path: str, codec: Any, values: np.ndarray) -> Future:
        """Write ``values`` (one whole chunk, in ``shared``) to ``path`` with ``codec`` in one of the processes;
        the future's result is None."""
        where = self.shared.locate(values)
        if where is None:
            raise ValueError("a chunk is written by a process from shared memory only")
        return self._submit(("write", os.path.abspath(path), codec, ("shared", *where, values.shape, values.dtype.str)))

    def read(self, path: str, out: np.ndarray) -> Future:
        """Decode the chunk file ``path`` into ``out`` (which lies in ``shared``) in one of the processes; the
        future's result is :func:`read_chunk_file`'s (False: no such file)."""
        where = self.shared.locate(out)
        if where is None:
            raise ValueError("a chunk is decoded by a process into shared memory only")
        return self._submit(("read", os.path.abspath(path), ("shared", *where, out.shape, out.dtype.str)))

    def _submit(self, job: tuple) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()  # queued is running: a cancel must not race the process's answer
        with self._lock:
            self._queue.append((future, job))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Send queued jobs to the processes with room for them."""
        with self._lock:
            for worker in self._workers:
                while self._queue and worker.alive and len(worker.pending) < self._DEPTH:
                    worker.send(*self._queue.popleft())
            if self._queue and not any(worker.alive for worker in self._workers):
                left, self._queue = list(self._queue), collections.deque()
                for future, _ in left:
                    future.set_exception(_stopped("every chunk process has stopped"))

    def close(self) -> None:
        """Let every process finish the jobs it was sent, then stop them; the jobs still queued here fail.
        (Not waiting for the queue: after Ctrl-C the main thread may have left a job half sent, which its
        process then reads as the end of its input.)"""
        with self._lock:
            left, self._queue = list(self._queue), collections.deque()
        for future, _ in left:
            future.set_exception(_stopped("the chunk processes stopped before this chunk was sent"))
        for worker in self._workers:
            worker.close_input()
        for worker in self._workers:
            worker.wait()
        self._workers.clear()


class _Worker:
    """One chunk process and the thread that reads its answers."""

    def __init__(self, index: int, on_answer: Callable[[], None], nice: int = 0):
        env = dict(os.environ)
        # the parent's import path, so `stores` is found whether gsae is installed or run from a checkout
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(path or os.curdir) for path in sys.path
                                                           if os.path.isdir(path or os.curdir)))
        # glibc serves each compressed chunk (about 3 MiB) from fresh mmap'd pages until its threshold has
        # grown, and a fresh process starts at 128 KiB: 700 page faults a job, 2 processes writing 1.1 GB/s
        # where 2 threads wrote 1.7 (this machine, /dev/shm).  Its largest threshold keeps them on the heap.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 << 20))
        # started in the folder that holds this `stores`: `python -c` puts its own folder first on the path,
        # and another folder's `stores` package would be imported instead (the jobs' paths are absolute)
        home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen([sys.executable, "-c", f"from stores.chunk_files import serve; serve({int(nice)})"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=home)
        self.pending: dict[int, Future] = {}
        self.alive = True
        self.ready = threading.Event()  # set when the process has said it started (or has stopped)
        self._lock = threading.Lock()
        self._on_answer = on_answer
        self._next = 0
        self._reader = threading.Thread(target=self._read, name=f"gsae-chunks-{index}", daemon=True)
        self._reader.start()

    def send(self, future: Future, job: tuple) -> None:
        """Send one job (called with the pool's lock held)."""
        number, self._next = self._next, self._next + 1
        with self._lock:
            self.pending[number] = future
        try:
            pickle.dump((number, job), self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
        except (OSError, ValueError) as exc:  # the process is gone
            with self._lock:
                mine = self.pending.pop(number, None)  # or the reader has failed it already
            self.alive = False
            if mine is not None:
                future.set_exception(_stopped(f"a chunk process has stopped ({exc})"))

    def _read(self) -> None:
        answers: BinaryIO = self.process.stdout
        try:
            try:
                pickle.load(answers)  # "ready"
            except (EOFError, OSError, pickle.UnpicklingError):
                return
            finally:
                self.ready.set()
            while True:
                try:
                    number, error, result = pickle.load(answers)
                except (EOFError, OSError, pickle.UnpicklingError):
                    return
                with self._lock:
                    future = self.pending.pop(number)
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
                self._answered()
        finally:  # whatever ended the answers: the jobs still out fail, and the queue goes to the others
            code = self.process.wait()
            self.alive = False
            with self._lock:
                left, self.pending = list(self.pending.values()), {}
            for future in left:
                future.set_exception(_stopped(f"a chunk process exited (code {code}) before finishing a chunk"))
            self._answered()

    def _answered(self) -> None:
        """Hand the pool's queued jobs out (never lets an error end this reader: its process's answers
        would then go unread and their futures wait forever)."""
        with contextlib.suppress(Exception):
            self._on_answer()

    def close_input(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()

    def wait(self) -> None:
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join()


def serve(nice: int = 0) -> None:
    """A chunk process: run the jobs read from stdin, answer each on stdout, until stdin closes; at a CPU
    priority lowered by ``nice``."""
    global CHECKSUM_RELEASES_GIL
    import numcodecs.blosc

    CHECKSUM_RELEASES_GIL = False  # one thread here: nobody to hand the GIL to
    # numcodecs turns blosc's own threads on when it runs on a main thread (use_threads None): a chunk of
    # several 256 KiB blocks then came out with its blocks in another order from run to run, not zarr's
    # bytes (the writer's threads are not main threads); and every process would start a thread per core
    numcodecs.blosc.use_threads = False
    lower_priority(nice)
    # Ctrl-C reaches the whole process group, and SIGTERM every process of a SLURM job: the parent stops us
    # (closing our stdin) after its own clean-up, which needs us until then
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    jobs = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed here goes to stderr, never into the answers
    mapped: dict[str, mmap.mmap] = {}
    populate = [_MADV_POPULATE_READ, _MADV_POPULATE_WRITE]  # emptied where the kernel has no such advice:
    # each block is then populated whole when first mapped (MAP_POPULATE), as before Linux 5.14 could do better
    populated: set[tuple[str, int, int]] = set()  # (block, offset, bytes) of the jobs whose pages are mapped

    def in_shared(name: str, offset: int, shape: tuple[int, ...], dtype: str, writing: bool) -> np.ndarray:
        block = mapped.get(name)
        if block is None:
            # a new block: let go of those the parent has removed (a window buffer that grew, a closed
            # stream), which would otherwise hold their /dev/shm pages until this process ends
            for gone in [known for known in mapped if not os.path.exists(os.path.join(_SHM_FOLDER, known))]:
                with contextlib.suppress(BufferError):
                    mapped.pop(gone).close()
                populated.difference_update([part for part in populated if part[0] == gone])
            with open(os.path.join(_SHM_FOLDER, name), "r+b") as handle:
                whole = 0 if populate else getattr(mmap, "MAP_POPULATE", 0)
                block = mapped[name] = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | whole)
        array = np.ndarray(shape, dtype=np.dtype(dtype), buffer=block, offset=offset)
        if populate and array.nbytes and (name, offset, array.nbytes) not in populated:
            populated.add((name, offset, array.nbytes))
            # Only this job's pages, in one call: a fault per 4 KiB page cost about as much as encoding
            # them, and populating the whole block when first mapped (MAP_POPULATE) made every process pay
            # for all of it, where each touches its jobs' part: a 140 MiB window took 55 ms a process here,
            # the part a 4 MiB chunk takes 1.4 ms faulted page by page and 0.9 ms populated (Linux 5.14+).
            start = offset - offset % mmap.PAGESIZE
            try:
                block.madvise(populate[writing], start, offset + array.nbytes - start)
            except OSError as exc:  # EINVAL: a kernel without the advice; other errors: the pages fault in
                if exc.errno == errno.EINVAL:
                    populate.clear()
        return array

    pickle.dump("ready", answers)
    answers.flush()
    while True:
        try:
            number, (kind, path, *payload) = pickle.load(jobs)
        except (EOFError, pickle.UnpicklingError):  # the end, or a job the parent stopped sending halfway
            break
        result, error = None, None
        try:
            if kind == "write":
                codec, source = payload
                write_or_remove_chunk_file(path, codec, in_shared(*source[1:], writing=False))
            else:
                result = read_chunk_file(path, in_shared(*payload[0][1:], writing=True))
        except Exception as exc:  # answered, raised in the parent (an OSError keeps its errno there)
            error = exc
        try:
            pickle.dump((number, error, result), answers, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            pickle.dump((number, RuntimeError(f"{type(error).__name__}: {error}"), None), answers)
        answers.flush()
