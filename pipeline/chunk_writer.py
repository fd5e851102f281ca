"""Stage one's writer: whole chunks compressed and written on a pool of threads (or encoder processes),
every layer's chunk a job of its own, a bounded number in flight, committed in order (so a killed cache
resumes to the same bytes)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from pipeline.processes import worker_threads
from stores import STORAGE_DTYPES, ActivationStore, ChunkStats, PendingChunk, write_seconds_writing
from stores.activation_store import FirstFailure
from stores.chunk_files import ChunkProcesses


@dataclass
class Chunk:
    index: int
    layers: np.ndarray  # (n_layers, rows, d_model) in the storage dtype
    tokens: np.ndarray
    stats: ChunkStats
    release: Callable[[], None] | None = None  # hands its buffer back for reuse once it is written


_IN_FLIGHT_BYTES = 2 << 30  # the most chunks in flight a forward batch may ask for (see ChunkWriter)


class ChunkWriter:
    """Compresses and writes chunks on a pool of threads, every layer's chunk a job of its own, and
    commits them in order on the calling thread.  At most ``max_pending`` chunks are in flight: the
    forward pass waits (back-pressure) rather than letting memory grow.  With ``encoder`` the whole
    local chunk files are written by its processes, the rest by the threads."""

    def __init__(self, store: ActivationStore, threads: int, seconds_before: float, rank: int | None = None,
                 batch_rows: int = 0, encoder: ChunkProcesses | None = None, nice: int = 0):
        """``nice``: the threads lower their CPU priority by that much (beside a GPU's thread: see
        pipeline.processes.WORKER_NICE)."""
        self.store, self.seconds_before, self.rank = store, seconds_before, rank  # rank: several writers
        self.encoder, self.threads = encoder, threads
        self.pool = worker_threads(threads, "gsae-writer", nice)
        # Enough chunks in flight to keep every thread busy, at least two, and a whole forward batch's
        # chunks (``batch_rows`` rows) plus one: with fewer, the forward thread waits for the writer
        # before the next batch, and the writer then idles while the model runs (on a GPU, the host
        # waits there).  benchmarks/cache_write.py --forward-ms times this: with the host idle 100 ms per
        # batch of 32,736 rows (8 chunks), 9 in flight reached 0.65-0.67 of max(writer, idle time) on this
        # 2-core machine where 2 reached 0.40-0.57 in the same processes (noisy: the writer alone took
        # 1.1-2.0 s); a 16-core GPU host, whose cores the writer does not fill, is where it matters.
        # At most _IN_FLIGHT_BYTES of chunks for that (a 32-layer d 4096 model's batch of 32 × 1024 rows
        # is 64 chunks, 8 GiB).
        self.max_pending = self.in_flight(store, threads, batch_rows)
        self.pending: deque[tuple[PendingChunk, Callable[[], None] | None]] = deque()  # with its release
        self.failure = FirstFailure()  # after a failed write, no other begins
        self.started = time.perf_counter()
        self._recorded = float("-inf")  # when the seconds were last recorded

    @staticmethod
    def in_flight(store: ActivationStore, threads: int, batch_rows: int = 0) -> int:
        """The most chunks in flight (``max_pending``, see __init__)."""
        per_batch = min(-(-batch_rows // store.chunk_tokens) + 1, _IN_FLIGHT_BYTES // chunk_bytes(store)) if batch_rows else 0
        return max(2, -(-2 * threads // (store.n_layers + 4)), per_batch)

    def submit(self, item: Chunk) -> None:
        """Commit the chunks already written, start writing ``item``, and wait while too many are in flight."""
        # Commit first: a chunk that finished before ``item`` starts is committed before any of
        # ``item``'s writes can land, whatever the speed of the pool (a disk that fills up after a
        # commit then leaves exactly the chunks committed so far, see test_cache_errors).
        self._commit(0)
        self.pending.append((self.store.start_chunk(item.index, list(item.layers), item.tokens, item.stats, self.pool,
                                                    self.encoder, self.failure), item.release))
        if len(self.pending) > self.max_pending:
            self._commit(len(self.pending) - self.max_pending)

    def drain(self) -> None:
        self._commit(len(self.pending))
        self._record_seconds(every=0.0)

    def _commit(self, oldest: int) -> None:
        """Commit the ``oldest`` chunks in flight, waiting for their writes, and every chunk after them
        whose writes are done: one commit for all (ActivationStore.finish_chunks)."""
        n = oldest
        while n < len(self.pending) and self.pending[n][0].done():
            n += 1
        if not n:
            return
        batch = [self.pending.popleft() for _ in range(n)]
        try:
            self.store.finish_chunks([pending for pending, _ in batch])  # re-raises a write error (disk full) here
        except BaseException:
            for pending, _ in batch:  # the failed chunk's writes not yet started, and those after it: none of them
                for future in pending.futures:
                    future.cancel()
            raise
        for _, release in batch:
            if release is not None:  # written: its buffer can take another chunk
                release()
        self._record_seconds()

    def _record_seconds(self, every: float = 1.0) -> None:
        """Record the time spent producing activations so far, summed over resumed runs: the "A" of the
        paper's cost (with several writers, each rank's own seconds in a part of its own: see
        write_seconds_writing).  At most once every ``every`` seconds: each record is a file written on the
        model's thread (about 2 ms a chunk here), and a killed run loses at most that much of its count."""
        now = time.perf_counter()
        if now - self._recorded >= every:
            write_seconds_writing(self.store, self.seconds_before + now - self.started, self.rank)
            self._recorded = now

    def close(self) -> None:
        for pending, _ in self.pending:
            for future in pending.futures:
                future.cancel()  # the threads' jobs not yet started (what the processes were sent, they finish)
        self.pool.shutdown(wait=True)
        if self.encoder is not None:
            self.encoder.close()

    @property
    def description(self) -> str:
        """Who writes, e.g. "16 processes" or "2 threads"."""
        if self.encoder is not None:
            return f"{self.encoder.processes} process{'es' if self.encoder.processes != 1 else ''}"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}"

    def write_all(self, chunks: Iterable[Chunk]) -> None:
        """Write and commit every chunk, then stop the pool (also when a write fails)."""
        try:
            for chunk in chunks:
                self.submit(chunk)
            self.drain()
        finally:
            self.close()


def chunk_bytes(store: ActivationStore) -> int:
    """Bytes of one chunk of every layer, as stored."""
    return store.n_layers * store.chunk_tokens * store.d_model * STORAGE_DTYPES[store.dtype][1]
