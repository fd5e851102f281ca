"""Shuffled training batches of (token, layer) rows, streamed chunk by chunk from the store.

For one SAE with input layers ``layers`` (each with its scale), an *epoch* is a seeded permutation of
the training chunks, cut into *windows* of ``window_chunks`` chunk ids.  A window holds those chunks of
**every** layer of the group, so it holds each layer's rows in exactly equal numbers; its rows are
shuffled together and cut into batches.  A batch is therefore a uniform draw over the group's layers
(each layer's count is hypergeometric, close to Binomial(B, 1/n)), as the paper's per-token layer draw
gives, and it mixes several passages.  Rows that do not fill a last batch are carried into the next
window, so an epoch yields every training (layer, row) exactly once.  The fewer than B rows carried past
an epoch's end are served in the next epoch's first window, which holds them again: a batch there can
hold such a row twice (with one window per epoch, a cache of a few windows' chunks, that is every
window; dropping them instead would leave up to B − 1 rows out of each epoch).  The stream's position (window,
batch, carried rows) is a small state that a checkpoint stores; resuming rebuilds the same batches.

A window is decoded in worker threads, one per core and shared by the streams of a run (numcodecs
releases the GIL), while the previous one is trained on, straight into one buffer in the stored dtype
(float16: half the memory of float32; a whole local chunk from its file, anything else through zarr).  A window takes ``window_chunks × n_layers`` chunks of
memory (about 4 MiB each), two windows at a time, in two buffers reused from window to window.

On CUDA the window buffers are pinned, and each window goes to the device whole, still float16, with its
shuffle and its rows' scales, in one ``non_blocking`` copy on a side stream; batches are then gathered,
converted and scaled by the device, so the training thread only launches a few kernels per batch and
each row crosses PCIe once (two device windows, reused, like the host ones).  On the CPU the batch is
gathered from the window, converted and scaled there.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stores.activation_store import ActivationStore, StoreError
from stores.chunk_files import ChunkProcesses, usable_cores
from stores.pinned import PinError, pin, pinned_empty, unpin


def as_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a torch tensor of the stored precision, without a copy (bfloat16 from its bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))


def _stop(futures: list[Future]) -> None:
    """Cancel the decodes not yet started and wait for those running: they write into a window buffer."""
    for future in futures:
        future.cancel()
    wait(futures)


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


class Batch:
    """One training batch: ``x`` (B, d) float32 on the device, scaled; ``layers``/``rows`` say where
    each row came from (host int64 arrays).

    Those two are gathered when first read: training never reads them, and the two gathers took ~70 µs for
    a batch of 8,192 on this CPU, on the training thread: about 2% of the H200's 3-ms step."""

    def __init__(self, x: torch.Tensor, window_layers: np.ndarray, window_rows: np.ndarray, picked: np.ndarray):
        self.x = x
        self._window_layers, self._window_rows, self._picked = window_layers, window_rows, picked

    @property
    def layers(self) -> np.ndarray:
        return self._window_layers[self._picked]

    @property
    def rows(self) -> np.ndarray:
        return self._window_rows[self._picked]


@dataclass
class _OnDevice:
    """A window's copy on the device: values (stored dtype), shuffle, per-row scales, and the event
    that marks the copy done."""

    values: torch.Tensor
    order: torch.Tensor
    scales: torch.Tensor
    ready: Any


@dataclass
class _Window:
    values: torch.Tensor  # (rows, d), stored dtype
    layers: np.ndarray  # (rows,) layer of each row
    rows: np.ndarray  # (rows,) row index in the store
    order: np.ndarray  # the window's shuffle
    n_batches: int
    on_device: _OnDevice | None = None


class TrainingStream:
    """Deterministic, resumable, prefetching, layer-uniform batches for one SAE."""

    def __init__(self, store: ActivationStore, layers: list[int], scales: list[float], chunks: list[int],
                 batch_size: int, seed: int, stream_id: int = 0, window_chunks: int = 8,
                 device: torch.device | str = "cpu", workers: int | None = None, pool: Executor | None = None,
                 device_windows: bool | None = None, processes: ChunkProcesses | None = None):
        """``pool``: decode threads shared with other streams (the SAEs of one run); without it the
        stream starts ``workers`` threads of its own (default: one per core).  ``device_windows``: batches
        gathered from a copy of the window on the device (always on CUDA; on the CPU, for tests, a
        second copy in memory).  ``processes``: the pool's threads hand each whole chunk to one of these to
        decode, into window buffers in their shared memory (pinned on CUDA); `gsae train --reader`."""
        self.store, self.layers, self.chunks = store, list(layers), list(chunks)
        self.scales = {layer: float(scale) for layer, scale in zip(layers, scales)}
        self.batch_size, self.seed, self.stream_id = batch_size, seed, stream_id
        self.window_chunks = max(1, window_chunks)
        self.device = torch.device(device)
        self.windows_per_epoch = -(-len(self.chunks) // self.window_chunks)
        self._own_pool = pool is None
        self.pool = pool or ThreadPoolExecutor(max_workers=workers or usable_cores(),
                                               thread_name_prefix=f"gsae-stream{stream_id}")
        self.window, self.batch_in_window = 0, 0
        self._carry_ids = np.zeros((0, 2), dtype=np.int64)  # (layer, row) carried into self.window
        self._current: _Window | None = None
        self._pending: dict[int, tuple[_Window, list[Future]]] = {}
        # the two window buffers (the one trained on, the one being decoded), reused: a fresh ~100 MiB
        # buffer per window cost ~40 ms of page faults, about a third of decoding the window
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._cuda = self.device.type == "cuda"
        self._dtype = _torch_dtype(store.dtype)
        self._scale_of = np.zeros(max(self.layers) + 1, dtype=np.float32)
        self._scale_of[self.layers] = [self.scales[layer] for layer in self.layers]
        self._device_windows = self._cuda or bool(device_windows)  # on CUDA always: batches live there
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._device_buffers: list[torch.Tensor | None] = [None, None]  # the windows' device copies, reused
        self._uploaded: list[Any] = [None, None]  # per host buffer: its last copy to the device (an event)
        self._released: list[Any] = [None, None]  # per device window: after the last batch gathered from it
        self.processes = processes
        # per host buffer made by gsae (in the processes' shared memory, or pinned at its exact size): its
        # memory and pinned address
        self._host: list[tuple[np.ndarray, int | None] | None] = [None, None]

    # ------------------------------------------------------------------ windows
    def _window_chunk_ids(self, window: int) -> list[int]:
        epoch, position = divmod(window, self.windows_per_epoch)
        order = np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(len(self.chunks))
        return [self.chunks[i] for i in order[position * self.window_chunks : (position + 1) * self.window_chunks]]

    def _read_into(self, out: torch.Tensor, layer: int, start: int, stop: int) -> None:
        """Decode rows ``[start, stop)`` of ``layer`` into ``out``.

        zarr writes the decoded chunk into ``out`` itself: reading an array and copying it would cost a
        4 MiB allocation and copy per chunk, 5-10% of its decode."""
        self.store.read_into(layer, start, stop, out.view(torch.uint8).numpy().view(self.store.layer_array(layer).dtype),
                             self.processes)

    def _schedule(self, window: int) -> None:
        """Start decoding ``window``: every (layer, chunk) of it into its slice of one buffer."""
        if window in self._pending:
            return
        ranges = [self.store.readable_rows(chunk) for chunk in self._window_chunk_ids(window)]
        total = len(self.layers) * sum(stop - start for start, stop in ranges)
        # room in front for the rows carried from the previous window (fewer than a batch): the window
        # is then used in place, never concatenated
        size = self.batch_size + total
        slot = window % 2
        if self._uploaded[slot] is not None:  # wait until the copy to the device out of this buffer is done
            self._uploaded[slot].synchronize()
            self._uploaded[slot] = None
        buffer = self._buffers[slot]
        if buffer is None or len(buffer) < size:
            buffer = self._buffers[slot] = self._new_buffer(slot, size)
        values = buffer[:size]
        layers, rows, futures, offset = [], [], [], self.batch_size
        for layer in self.layers:
            for start, stop in ranges:
                n = stop - start
                futures.append(self.pool.submit(self._read_into, values[offset : offset + n], layer, start, stop))
                layers.append(np.full(n, layer, dtype=np.int64))
                rows.append(np.arange(start, stop, dtype=np.int64))
                offset += n
        window_data = _Window(values, np.concatenate(layers), np.concatenate(rows), np.empty(0, np.int64), 0)
        self._pending[window] = (window_data, futures)

    def _new_buffer(self, slot: int, size: int) -> torch.Tensor:
        """A host window buffer of ``size`` rows: pinned on CUDA (at its exact size: torch's pinned allocator
        would take 256 MiB for a window of 143); in the processes' shared memory with them."""
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        shape = (size, self.store.d_model * itemsize)
        if self.processes is None:
            if not self._cuda:
                return torch.empty(size, self.store.d_model, dtype=self._dtype)
            try:
                block, address = pinned_empty(shape, np.dtype(np.uint8))
            except PinError:  # cudaHostRegister refused: torch's allocator, which pins with cudaHostAlloc
                self._free_host(slot)
                return torch.empty(size, self.store.d_model, dtype=self._dtype, pin_memory=True)
        else:
            window = f"a {size * self.store.d_model * itemsize / 2**20:,.0f} MiB window of the training stream's processes"
            try:
                block = self.processes.shared.empty(shape, np.dtype(np.uint8))
            except OSError as exc:  # the old buffer stays this slot's
                raise StoreError(f"no room in /dev/shm for {window} ({exc.strerror or exc}); pass --reader threads") from None
            try:
                address = pin(block) if self._cuda else None
            except PinError as exc:  # (the processes' start pinned a page of theirs: seldom here)
                self.processes.shared.release(block)
                raise StoreError(f"cannot pin {window} for the GPU ({exc}); pass --reader threads") from None
        self._free_host(slot)
        self._host[slot] = (block, address)
        return torch.from_numpy(block).view(self._dtype)

    def _free_host(self, slot: int) -> None:
        """Let go of a host buffer gsae made (no copy out of it is running: see close and _schedule)."""
        if self._host[slot] is None:
            return
        block, address = self._host[slot]
        if address is not None:
            unpin(address)
        if self.processes is not None:
            self.processes.shared.release(block)
        self._host[slot] = None

    def prefetch(self) -> None:
        """Start decoding the window of the next batch now, on the pool, rather than at the first
        :meth:`next_batch` (a rewind with :meth:`load_state_dict` cancels it)."""
        if self._current is None:
            self._schedule(self.window)

    def _read_ids(self, ids: np.ndarray) -> torch.Tensor:
        """Stored values of individual (layer, row) ids, for carried rows after a resume."""
        out = torch.empty(len(ids), self.store.d_model, dtype=self._dtype)
        for layer in np.unique(ids[:, 0]):
            mask = ids[:, 0] == layer
            block = self.store.read_selected(int(layer), ids[mask, 1])
            out[torch.from_numpy(mask)] = as_tensor(block, self.store.dtype)
        return out

    def _open_window(self, carry_values: torch.Tensor | None) -> None:
        window = self.window
        self._schedule(window)
        self._schedule(window + 1)  # decode the next window while this one trains
        data, futures = self._pending.pop(window)
        try:
            for future in futures:
                future.result()
        except BaseException:  # one chunk failed: its siblings must not go on writing into the buffer
            _stop(futures)
            raise
        if carry_values is None:
            carry_values = self._read_ids(self._carry_ids)
        front = self.batch_size - len(carry_values)
        data.values[front : self.batch_size] = carry_values
        data.values = data.values[front:]
        if len(carry_values):
            data.layers = np.concatenate([self._carry_ids[:, 0], data.layers])
            data.rows = np.concatenate([self._carry_ids[:, 1], data.rows])
        data.order = np.random.default_rng([self.seed, self.stream_id, window, 1]).permutation(len(data.values))
        data.n_batches = len(data.values) // self.batch_size
        if self._cuda:  # every batch of the previous window is queued: the window before it is free
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(self.device))
            self._released[(window + 1) % 2] = released
        if self._device_windows and data.n_batches:  # (a window of carried rows only is never gathered from)
            data.on_device = self._upload(data, window % 2)
        self._current = data

    def _upload(self, data: _Window, slot: int) -> _OnDevice:
        """Copy the window (values, shuffle, row scales) into device buffer ``slot`` once the training
        thread's stream has gathered the last batch of the window that used it before (two windows ago),
        so the copy overlaps the steps of the window in between that are still queued."""
        n, d = data.values.shape
        order = torch.from_numpy(data.order)
        scales = torch.from_numpy(self._scale_of[data.layers])
        if not self._cuda:  # the same steps in memory, so that the CPU tests cover them
            target = self._device_buffer(slot, n, d)
            target.copy_(data.values)
            return _OnDevice(target, order, scales, None)
        training = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            if self._released[slot] is not None:
                self._copy_stream.wait_event(self._released[slot])
            target = self._device_buffer(slot, n, d)
            target.copy_(data.values, non_blocking=True)  # pinned: asynchronous
            # from pinned copies: a copy from pageable memory would first wait for the copy stream, and so
            # for everything the training stream had queued (one host sync per window)
            order = order.pin_memory().to(self.device, non_blocking=True)
            scales = scales.pin_memory().to(self.device, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # waited for on the host too: block, do not spin a core
            ready.record(self._copy_stream)
        for tensor in (target, order, scales):  # made on the copy stream, read on the training stream:
            tensor.record_stream(training)  # their memory is not reused before that stream is done
        self._uploaded[slot] = ready
        return _OnDevice(target, order, scales, ready)

    def _device_buffer(self, slot: int, n: int, d: int) -> torch.Tensor:
        """The first ``n`` rows of device window ``slot``, as large as its host window (so a short window
        or one with fewer carried rows reuses it)."""
        buffer = self._device_buffers[slot]
        if buffer is None or len(buffer) < n:
            rows = max(n, len(self._buffers[slot]))
            buffer = self._device_buffers[slot] = torch.empty(rows, d, dtype=self._dtype, device=self.device)
        return buffer[:n]

    def _next_picked(self) -> tuple[_Window, slice]:
        """The current window and the slice of its shuffle that is the next batch."""
        while True:
            if self._current is None:  # first batch, or just resumed: carried rows are re-read by id
                self._open_window(None)
            current = self._current
            if self.batch_in_window < current.n_batches:
                b = self.batch_in_window
                self.batch_in_window += 1
                return current, slice(b * self.batch_size, (b + 1) * self.batch_size)
            leftover = current.order[current.n_batches * self.batch_size :]
            self._carry_ids = np.stack([current.layers[leftover], current.rows[leftover]], axis=1)
            carry_values = current.values[torch.from_numpy(leftover)]
            self.window, self.batch_in_window = self.window + 1, 0
            try:
                self._open_window(carry_values)
            except BaseException:  # the state names the new window: a retry re-reads it, carried rows by id
                self._current = None
                raise

    # ------------------------------------------------------------------ batches
    def next_batch(self) -> Batch:
        """The next batch: ``x`` float32 on the stream's device, scaled."""
        current, part = self._next_picked()
        picked = current.order[part]
        window = current.on_device
        if window is None:
            x = current.values.index_select(0, torch.from_numpy(picked)).float()
            x.mul_(torch.from_numpy(self._scale_of[current.layers[picked]])[:, None])
        else:
            if window.ready is not None:  # the training stream waits for the copy on the device, not here
                torch.cuda.current_stream(self.device).wait_event(window.ready)
            index = window.order[part]
            x = window.values.index_select(0, index).float()
            x.mul_(window.scales.index_select(0, index)[:, None])
        return Batch(x, current.layers, current.rows, picked)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the next batch to hand out."""
        return {"window": int(self.window), "batch": int(self.batch_in_window), "carry": self._carry_ids.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.batch_in_window = int(state["window"]), int(state["batch"])
        self._carry_ids = np.asarray(state["carry"], dtype=np.int64).reshape(-1, 2)
        self._current = None
        self._drain()
        if self._cuda:  # both device windows may still be read by batches already handed out
            handed_out = torch.cuda.Event()
            handed_out.record(torch.cuda.current_stream(self.device))
            self._released = [handed_out, handed_out]

    def _drain(self) -> None:
        """Cancel the pending decodes and wait for those already running (they write into the buffers)."""
        _stop([future for _, pending in self._pending.values() for future in pending])
        self._pending.clear()

    def close(self) -> None:
        """Stop decoding and let go of the windows (pinned host memory, device memory): the run's held-out
        evaluation and the next run of a process do not hold them.  The position (``state_dict``) stays."""
        self._drain()
        if self._own_pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self._copy_stream is not None:  # no copy out of a host window still running
            self._copy_stream.synchronize()
        self._current = None
        for slot in (0, 1):
            self._free_host(slot)
        self._buffers, self._device_buffers = [None, None], [None, None]
        self._uploaded, self._released = [None, None], [None, None]
