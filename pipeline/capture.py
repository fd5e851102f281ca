"""Stage one's model side: forward hooks hand every block's rows, in the storage dtype, to an assembler that
copies them into reused chunk buffers (pinned beside a GPU: one asynchronous device→host copy, no staging)
and takes each chunk's statistics where the rows are; whole chunks then go to :mod:`pipeline.chunk_writer`."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Container, Iterator

import numpy as np
import torch

from pipeline.chunk_writer import Chunk
from pipeline.errors import GsaeError
from pipeline.models import LoadedModel, block_output
from stores import FLOAT16_MAX, ActivationStore, ChunkStats, StatsAccumulator
from stores.chunk_files import SharedBuffers
from stores.pinned import PinError, pin, pinned_empty, unpin


class ForwardCapture:
    """Forward hooks on every block that hand each block's stored rows to a callback, where the model runs."""

    class _Stop(Exception):
        """Raised by the last block's hook: nothing after it is needed."""

    def __init__(self, lm: LoadedModel, first_row: int, dtype: str):
        self.lm = lm
        self.first_row = first_row  # 1 drops the BOS position
        self.dtype = dtype
        self.on_stored: Callable[[int, torch.Tensor], None] | None = None  # set by run()
        self.handles = [block.register_forward_hook(self._hook(layer)) for layer, block in enumerate(lm.blocks)]

    def _hook(self, layer: int):
        last = layer == self.lm.n_layers - 1

        def hook(module: Any, inputs: Any, output: Any) -> None:
            if self.on_stored is not None:
                self.on_stored(layer, self._stored(block_output(output)[:, self.first_row :]))
            if last:
                raise self._Stop

        return hook

    def _stored(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block's rows (batch × positions flattened) in the storage dtype, still where the model runs."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.dtype == "float16":
            stored = hidden.to(torch.float16)
            if stored.is_cuda:  # beyond the float16 range: clip, counted in the chunk stats
                stored.clamp_(-FLOAT16_MAX, FLOAT16_MAX)  # always: testing first would wait for the GPU
            elif torch.isinf(stored).any():
                stored.clamp_(-FLOAT16_MAX, FLOAT16_MAX)
            return stored
        if self.dtype == "bfloat16":
            return hidden.to(torch.bfloat16).view(torch.int16)
        return hidden.to(torch.float32)

    def run(self, input_ids: torch.Tensor, on_stored: Callable[[int, torch.Tensor], None]) -> Any:
        """Run the model on ``input_ids``; ``on_stored(layer, rows)`` gets each block's stored rows as
        soon as they exist (on a GPU: before any later block runs, so no layer's rows outlive its hook).
        On a GPU this returns once the work is queued, with an event that marks it done (copies included:
        the caller waits for it before it uses the rows); on a CPU, once it is done, with None."""
        self.on_stored = on_stored
        with torch.inference_mode():
            try:
                self.lm.model.base_model(input_ids=input_ids, use_cache=False)
            except self._Stop:
                pass
            except BaseException:
                if input_ids.is_cuda:  # no copy still lands in a chunk buffer after an error
                    torch.cuda.current_stream().synchronize()
                raise
            finally:
                self.on_stored = None
        if not input_ids.is_cuda:
            return None
        done = torch.cuda.Event(blocking=True)  # waited for on the host: block, do not spin a core
        done.record()
        return done

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class ChunkBuffers:
    """Reused (n_layers, chunk rows, d_model) chunk buffers: pinned where the model runs on a GPU (with
    cudaHostRegister, at their exact size), so the hooks copy rows from the device straight into the chunk
    (no staging buffer, no second copy on the host), and never fresh memory per chunk.  With ``shared``, in
    shared memory that the writer's encoder processes read."""

    def __init__(self, shape: tuple[int, int, int], np_dtype: np.dtype, pinned: bool,
                 shared: SharedBuffers | None = None):
        self.shape, self.np_dtype, self.pinned, self.shared = shape, np_dtype, pinned, shared
        self.free: list[np.ndarray] = []
        self.registered: list[int] = []  # addresses of the buffers pinned with cudaHostRegister
        # seconds spent making new buffers where they were needed (in the hooks), and letting them go (a phase
        # of their own: pinning fresh memory ran at 1.3 GB/s on the H200 machine's VM, and the ring of a
        # 32 × 1024 batch of 6 × 512 is 600 MiB)
        self.seconds_making = self.seconds_closing = 0.0
        self.made = 0
        self._lock = threading.Lock()
        self._ahead: threading.Thread | None = None
        self._stop_ahead = threading.Event()

    def make_ahead(self, count: int) -> None:
        """Make buffers up to ``count`` in all on a thread of their own, into the free ones, while the first
        batches run: where they are pinned (a GPU), beside the model's forward rather than in its hooks.
        (Pinning is mostly page faults and the driver's call, neither of which holds the GIL.)  Not for the
        processes' shared memory, nor on a CPU, where a new buffer costs nothing until it is written."""
        if self.pinned and self.shared is None and count > 0:
            # the device this thread (a rank's) works on: CUDA's current device is per thread, and pinning from a
            # thread still on device 0 made a context there for every rank
            device = torch.cuda.current_device()
            thread = threading.Thread(target=self._make, args=(count, device), name="gsae-chunk-buffers", daemon=True)
            thread.start()
            self._ahead = thread

    def _make(self, count: int, device: int) -> None:
        torch.cuda.set_device(device)
        while not self._stop_ahead.is_set() and self.made < count:
            try:
                buffer = self._new()
            except Exception:  # the hooks make their own, and meet the error there
                return
            self.free.append(buffer)

    def take(self) -> np.ndarray:
        if self.free:
            return self.free.pop()
        start = time.perf_counter()
        try:
            return self._new()
        finally:
            self.seconds_making += time.perf_counter() - start

    def _new(self) -> np.ndarray:
        with self._lock:
            self.made += 1
        return self._make_one()

    def _make_one(self) -> np.ndarray:
        if self.shared is not None:
            try:
                buffer = self.shared.empty(self.shape, self.np_dtype)
            except OSError as exc:
                raise GsaeError(f"no room in /dev/shm for another chunk buffer of the writer's processes "
                                f"({exc.strerror or exc}); pass --writer threads") from None
            if self.pinned:
                self._register(buffer)
            return buffer
        if not self.pinned:
            return np.empty(self.shape, dtype=self.np_dtype)
        try:  # at its exact size (torch's pinned allocator would take 32 MiB for a chunk of 24)
            buffer, address = pinned_empty(self.shape, self.np_dtype)
        except PinError:  # cudaHostRegister refused: torch's allocator, which pins with cudaHostAlloc
            # (torch has no uint16 for pinned allocation in every version: pin bytes, view them as the dtype)
            raw = torch.empty(int(np.prod(self.shape)) * self.np_dtype.itemsize, dtype=torch.uint8, pin_memory=True)
            return raw.numpy().view(self.np_dtype).reshape(self.shape)
        self.registered.append(address)
        return buffer

    def give_back(self, buffer: np.ndarray) -> None:
        self.free.append(buffer)

    def _register(self, buffer: np.ndarray) -> None:
        try:
            self.registered.append(pin(buffer))
        except PinError as exc:
            raise GsaeError(f"could not pin shared memory for the writer's processes ({exc}); pass --writer threads") from None

    def close(self) -> None:
        """Unpin the buffers and let their memory go (every copy into them has finished)."""
        start = time.perf_counter()
        self._stop_ahead.set()
        try:
            if self._ahead is not None:
                self._ahead.join()
        finally:  # also when Ctrl-C lands in the join
            self._release()
        self.seconds_closing += time.perf_counter() - start

    def _release(self) -> None:
        for address in self.registered:
            unpin(address)
        self.registered.clear()
        self.free.clear()
        if self.shared is not None:
            self.shared.close()


class ChunkAssembler:
    """Collects rows from batches into whole chunks of the store, with their statistics.

    Only the chunks in ``chunks`` are assembled (this rank's uncommitted ones; default: every chunk from
    the committed prefix on).  Each block's rows are taken in its forward hook (:meth:`take`), segment by
    segment, a segment being a forward batch's rows inside one chunk: copied into the chunk's buffer and
    added to its statistics there, on the model's device with torch's threads.  The batches are the same
    in every run and on every rank, so the sums come out bit-identical."""

    def __init__(self, store: ActivationStore, np_dtype: np.dtype, chunks: Container[int] | None = None,
                 pinned: bool = False, shared: SharedBuffers | None = None):
        self.store = store
        self.np_dtype = np_dtype
        self.chunks = range(store.chunks_written, store.n_chunks_planned) if chunks is None else chunks
        self.open: dict[int, OpenChunk] = {}
        self.buffers = ChunkBuffers((store.n_layers, store.chunk_tokens, store.d_model), np_dtype, pinned, shared)

    def _segments(self, row: int, stop: int) -> Iterator[tuple[int, OpenChunk, int, int]]:
        """(chunk, its open part, first row, row after the last) for each of this assembler's chunks that
        the rows ``[row, stop)`` fall in, opening the parts they start."""
        step = self.store.chunk_tokens
        for chunk in range(row // step, -(-stop // step)):
            if chunk not in self.chunks:
                continue
            chunk_start, chunk_stop = self.store.chunk_rows(chunk)
            first, last = max(row, chunk_start), min(stop, chunk_stop)
            if first >= last:
                continue
            part = self.open.get(chunk)
            if part is None:
                whole = self.buffers.take()
                part = self.open[chunk] = OpenChunk(whole, whole[:, : chunk_stop - chunk_start],
                                                np.empty(chunk_stop - chunk_start, dtype=np.int32), chunk_start)
            yield chunk, part, first, last

    def take(self, row: int, stop: int, layer: int, values: torch.Tensor) -> None:
        """One block's rows ``[row, stop)`` of a batch (``values[i]`` is row ``row + i``, stored dtype, on
        whatever device the model runs): into the chunks they fall in and their statistics.  From a GPU
        the copies are asynchronous, and so is the read-back of the statistics of a chunk the last block
        completes; the event of :meth:`ForwardCapture.run` marks them done."""
        last_layer = layer == self.store.n_layers - 1
        for chunk, part, first, last in self._segments(row, stop):
            rows = values[first - row : last - row]
            self._add_stats(part, layer, rows)
            target = torch.from_numpy(part.buffer[layer, first - part.start : last - part.start])
            target.copy_(rows.view(target.dtype), non_blocking=values.is_cuda)
            if last_layer and last == self.store.chunk_rows(chunk)[1] and part.stats is not None:
                part.stats.start_result()

    def _add_stats(self, part: OpenChunk, layer: int, rows: torch.Tensor) -> None:
        if part.stats is None:  # a lossy store's statistics are of its bit-rounded rows, as stored
            part.stats = StatsAccumulator(self.store.n_layers, self.store.d_model, self.store.dtype, rows.device,
                                          keep_bits=(self.store.attrs.get("codec") or {}).get("keep_bits"))
        part.stats.add(layer, rows)

    def add(self, row: int, tokens: np.ndarray) -> Iterator[Chunk]:
        """Close the rows ``[row, row + len(tokens))`` of one batch, whose every block :meth:`take` has
        taken (and whose device copies have finished); yield the chunks they complete."""
        stop = row + len(tokens)
        for chunk, part, first, last in list(self._segments(row, stop)):
            if first - part.start != part.filled:
                raise RuntimeError(f"chunk {chunk}: rows from {first} given, {part.start + part.filled} expected")
            take = last - first
            part.tokens[part.filled : part.filled + take] = tokens[first - row : last - row]
            part.filled += take
            if part.filled == part.buffer.shape[1]:
                yield self._emit(chunk)

    def flush(self) -> Chunk | None:
        """The last, short chunk when the corpus ran out before the planned tokens."""
        for chunk, part in sorted(self.open.items()):
            if part.filled:
                part.buffer, part.tokens = part.buffer[:, : part.filled], part.tokens[: part.filled]
                return self._emit(chunk)
        return None

    def _emit(self, chunk: int) -> Chunk:
        part = self.open.pop(chunk)
        return Chunk(chunk, part.buffer, part.tokens, self._stats_of(chunk, part),
                      release=functools.partial(self.buffers.give_back, part.whole))

    def _stats_of(self, chunk: int, part: OpenChunk) -> ChunkStats:
        return part.stats.result()

    def close(self) -> None:
        """Let the chunk buffers go (after the writer has finished with them): unpinned first, so that a buffer
        only an open chunk still holds is not unpinned again as it goes."""
        self.buffers.close()
        self.open.clear()


@dataclass
class OpenChunk:
    """A chunk being assembled."""

    whole: np.ndarray  # the reused buffer it lives in
    buffer: np.ndarray  # (n_layers, rows, d_model) in the storage dtype: the chunk's part of ``whole``
    tokens: np.ndarray
    start: int  # the chunk's first row in the store
    stats: StatsAccumulator | None = None  # made on the device of the first rows added
    filled: int = 0
