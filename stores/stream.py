"""Shuffled training batches of (token, layer) rows, streamed chunk by chunk from the store.

For one SAE with input layers ``layers`` (each with its scale), an *epoch* is a seeded permutation of
the training chunks, cut into *windows* of ``window_chunks`` chunk ids.  A window holds those chunks of
**every** layer of the group, so it holds each layer's rows in exactly equal numbers; its rows are
shuffled together and cut into batches.  A batch is therefore a uniform draw over the group's layers
(each layer's count is hypergeometric, close to Binomial(B, 1/n)), as the paper's per-token layer draw
gives, and it mixes several passages.  Rows that do not fill a last batch are carried into the next
window, so an epoch yields every training (layer, row) exactly once.  The stream's position (window,
batch, carried rows) is a small state that a checkpoint stores; resuming rebuilds the same batches.

A window is decoded in worker threads, one per core and shared by the streams of a run (numcodecs
releases the GIL), while the previous one is trained on, by zarr straight into one buffer in the stored
dtype (float16: half the memory of float32).  A window takes ``window_chunks × n_layers`` chunks of
memory (about 4 MiB each), two windows at a time, in two buffers reused from window to window.

On CUDA, each batch is gathered into one of a ring of reused pinned host buffers, still float16, and
copied with ``non_blocking=True`` on a side stream one batch ahead; the device converts and scales it.
On the CPU the batch is converted and scaled in place.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stores.activation_store import ActivationStore

_RING = 3  # pinned buffers in flight: the batch in use, the one being copied, one being gathered


def split_chunks(store: ActivationStore, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(training chunks, held-out chunks): the held-out slice is the last chunks of the corpus."""
    n = store.n_chunks
    if n < 2:
        raise ValueError(f"the cache has {n} chunk; training needs at least 2 (one is held out)")
    held_out = max(1, round(n * eval_fraction))
    return list(range(n - held_out)), list(range(n - held_out, n))


def as_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values as a torch tensor of the stored precision, without a copy (bfloat16 from its bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


@dataclass
class Batch:
    """One training batch: ``x`` (B, d) float32 on the device, scaled; ``layers``/``rows`` say where
    each row came from (host int64 arrays)."""

    x: torch.Tensor
    layers: np.ndarray
    rows: np.ndarray


@dataclass
class _Window:
    values: torch.Tensor  # (rows, d), stored dtype
    layers: np.ndarray  # (rows,) layer of each row
    rows: np.ndarray  # (rows,) row index in the store
    order: np.ndarray  # the window's shuffle
    n_batches: int


class TrainingStream:
    """Deterministic, resumable, prefetching, layer-uniform batches for one SAE."""

    def __init__(self, store: ActivationStore, layers: list[int], scales: list[float], chunks: list[int],
                 batch_size: int, seed: int, stream_id: int = 0, window_chunks: int = 8,
                 device: torch.device | str = "cpu", workers: int | None = None, pool: Executor | None = None):
        """``pool``: decode threads shared with other streams (the SAEs of one run); without it the
        stream starts ``workers`` threads of its own (default: one per core)."""
        self.store, self.layers, self.chunks = store, list(layers), list(chunks)
        self.scales = {layer: float(scale) for layer, scale in zip(layers, scales)}
        self.batch_size, self.seed, self.stream_id = batch_size, seed, stream_id
        self.window_chunks = max(1, window_chunks)
        self.device = torch.device(device)
        self.windows_per_epoch = -(-len(self.chunks) // self.window_chunks)
        self._own_pool = pool is None
        self.pool = pool or ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1,
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
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._ring: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
        self._ring_next = 0
        self._ahead: tuple[Batch, Any] | None = None
        self._ahead_state: tuple[int, int, np.ndarray] | None = None

    # ------------------------------------------------------------------ windows
    def _window_chunk_ids(self, window: int) -> list[int]:
        epoch, position = divmod(window, self.windows_per_epoch)
        order = np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(len(self.chunks))
        return [self.chunks[i] for i in order[position * self.window_chunks : (position + 1) * self.window_chunks]]

    def _read_into(self, out: torch.Tensor, layer: int, start: int, stop: int) -> None:
        """Decode rows ``[start, stop)`` of ``layer`` into ``out``.

        zarr writes the decoded chunk into ``out`` itself: reading an array and copying it would cost a
        4 MiB allocation and copy per chunk, 5-10% of its decode."""
        self.store.read_into(layer, start, stop, out.view(torch.uint8).numpy().view(self.store.layer_array(layer).dtype))

    def _schedule(self, window: int) -> None:
        """Start decoding ``window``: every (layer, chunk) of it into its slice of one buffer."""
        if window in self._pending:
            return
        ranges = [self.store.readable_rows(chunk) for chunk in self._window_chunk_ids(window)]
        total = len(self.layers) * sum(stop - start for start, stop in ranges)
        # room in front for the rows carried from the previous window (fewer than a batch): the window
        # is then used in place, never concatenated
        size = self.batch_size + total
        buffer = self._buffers[window % 2]
        if buffer is None or len(buffer) < size:
            buffer = self._buffers[window % 2] = torch.empty(size, self.store.d_model, dtype=self._dtype)
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
        for future in futures:
            future.result()
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
        self._current = data

    def _next_picked(self) -> tuple[_Window, np.ndarray]:
        """The current window and the positions in it of the next batch's rows."""
        while True:
            if self._current is None:  # first batch, or just resumed: carried rows are re-read by id
                self._open_window(None)
            current = self._current
            if self.batch_in_window < current.n_batches:
                b = self.batch_in_window
                self.batch_in_window += 1
                return current, current.order[b * self.batch_size : (b + 1) * self.batch_size]
            leftover = current.order[current.n_batches * self.batch_size :]
            self._carry_ids = np.stack([current.layers[leftover], current.rows[leftover]], axis=1)
            carry_values = current.values[torch.from_numpy(leftover)]
            self.window, self.batch_in_window = self.window + 1, 0
            self._open_window(carry_values)

    # ------------------------------------------------------------------ batches
    def _host_batch(self) -> Batch:
        current, picked = self._next_picked()
        layers, rows = current.layers[picked], current.rows[picked]
        x = current.values.index_select(0, torch.from_numpy(picked)).float()
        x.mul_(torch.from_numpy(self._scale_of[layers])[:, None])
        return Batch(x, layers, rows)

    def _pinned_slot(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A reused pinned (values, scales) pair whose previous copy has finished."""
        if len(self._ring) < _RING:
            self._ring.append((torch.empty(self.batch_size, self.store.d_model, dtype=self._dtype).pin_memory(),
                               torch.empty(self.batch_size, dtype=torch.float32).pin_memory(), None))
        values, scales, copied = self._ring[self._ring_next]
        if copied is not None:
            copied.synchronize()  # the copy out of this buffer has finished: safe to overwrite
        return values[:n_rows], scales[:n_rows]

    def _device_batch(self) -> tuple[Batch, Any]:
        current, picked = self._next_picked()
        layers, rows = current.layers[picked], current.rows[picked]
        values, scales = self._pinned_slot(len(picked))
        torch.index_select(current.values, 0, torch.from_numpy(picked), out=values)
        scales.copy_(torch.from_numpy(self._scale_of[layers]))
        with torch.cuda.stream(self._copy_stream):
            raw = values.to(self.device, non_blocking=True)
            row_scales = scales.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        slot = self._ring_next
        self._ring[slot] = (*self._ring[slot][:2], ready)
        self._ring_next = (slot + 1) % _RING
        return Batch(raw, layers, rows), (ready, row_scales)

    def next_batch(self) -> Batch:
        """The next batch; on CUDA the one after it is already being copied."""
        if not self._cuda:
            return self._host_batch()
        if self._ahead is None:
            self._ahead = self._device_batch()
        batch, (ready, row_scales) = self._ahead
        current_stream = torch.cuda.current_stream(self.device)
        current_stream.wait_event(ready)
        batch.x.record_stream(current_stream)
        row_scales.record_stream(current_stream)
        batch.x = batch.x.float().mul_(row_scales[:, None])  # converted and scaled on the device
        # the position before the batch copied ahead; its carried ids are spelled out only by state_dict():
        # a list of up to a batch of ids per step cost ~1.5 ms here
        self._ahead_state = (self.window, self.batch_in_window, self._carry_ids)
        self._ahead = self._device_batch()
        return batch

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the next batch to hand out (a prefetched batch is handed out again)."""
        if self._ahead is not None and self._ahead_state is not None:
            window, batch, carry = self._ahead_state  # _carry_ids is replaced, never changed in place
        else:
            window, batch, carry = self.window, self.batch_in_window, self._carry_ids
        return {"window": int(window), "batch": int(batch), "carry": carry.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.batch_in_window = int(state["window"]), int(state["batch"])
        self._carry_ids = np.asarray(state["carry"], dtype=np.int64).reshape(-1, 2)
        self._current, self._ahead, self._ahead_state = None, None, None
        self._drain()

    def _drain(self) -> None:
        """Cancel the pending decodes and wait for those already running (they write into the buffers)."""
        futures = [future for _, pending in self._pending.values() for future in pending]
        for future in futures:
            future.cancel()
        wait(futures)
        self._pending.clear()

    def close(self) -> None:
        self._drain()
        if self._own_pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
