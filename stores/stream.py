"""Shuffled training batches of (token, layer) rows, streamed chunk by chunk from the store.

For one SAE with input layers ``layers`` (each with its scale), an *epoch* is a seeded permutation of
every (layer, training chunk) pair.  The epoch is cut into *windows* of ``window_chunks`` pairs; a
window's chunks are decoded in worker threads while the previous window is trained on, their rows are
shuffled together (so a batch mixes several passages and layers), and cut into batches.  Rows that do
not fill a last batch are carried into the next window, so an epoch yields every training row of every
layer exactly once.  The stream's position (window, batch, carried rows) is a small state that a
checkpoint stores; resuming rebuilds the same batches.

On CUDA, batches are gathered into pinned host memory and copied with ``non_blocking=True`` on a side
stream one batch ahead; on the CPU they are used in place.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stores.activation_store import ActivationStore, to_float32


def split_chunks(store: ActivationStore, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(training chunks, held-out chunks): the held-out slice is the last chunks of the corpus."""
    n = store.n_chunks
    if n < 2:
        raise ValueError(f"the cache has {n} chunk; training needs at least 2 (one is held out)")
    held_out = max(1, round(n * eval_fraction))
    return list(range(n - held_out)), list(range(n - held_out, n))


@dataclass
class Batch:
    """One training batch: ``x`` (B, d) float32 on the device, scaled; ``layers``/``rows`` say where
    each row came from (host int64 arrays)."""

    x: torch.Tensor
    layers: np.ndarray
    rows: np.ndarray


class TrainingStream:
    """Deterministic, resumable, prefetching batches for one SAE."""

    def __init__(self, store: ActivationStore, layers: list[int], scales: list[float], chunks: list[int],
                 batch_size: int, seed: int, stream_id: int = 0, window_chunks: int = 8,
                 device: torch.device | str = "cpu", workers: int = 2):
        self.store, self.layers, self.chunks = store, list(layers), list(chunks)
        self.scales = {layer: float(scale) for layer, scale in zip(layers, scales)}
        self.batch_size, self.seed, self.stream_id = batch_size, seed, stream_id
        self.window_chunks = max(1, window_chunks)
        self.device = torch.device(device)
        self.pairs = [(layer, chunk) for layer in self.layers for chunk in self.chunks]
        self.windows_per_epoch = -(-len(self.pairs) // self.window_chunks)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"gsae-stream{stream_id}")
        self.window, self.batch_in_window = 0, 0
        self._carry_ids = np.zeros((0, 2), dtype=np.int64)  # (layer, row) carried into self.window
        self._current: dict[str, Any] | None = None
        self._pending: dict[int, list[Future]] = {}
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._ahead: tuple[Batch, Any] | None = None
        self._ahead_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ windows
    def _window_pairs(self, window: int) -> list[tuple[int, int]]:
        epoch, position = divmod(window, self.windows_per_epoch)
        order = np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(len(self.pairs))
        picked = order[position * self.window_chunks : (position + 1) * self.window_chunks]
        return [self.pairs[i] for i in picked]

    def _read(self, layer: int, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, stop = self.store.readable_rows(chunk)
        values = to_float32(self.store.read_rows(layer, start, stop), self.store.dtype) * self.scales[layer]
        return values.astype(np.float32, copy=False), np.full(stop - start, layer), np.arange(start, stop)

    def _schedule(self, window: int) -> None:
        if window not in self._pending:
            self._pending[window] = [self.pool.submit(self._read, *pair) for pair in self._window_pairs(window)]

    def _read_ids(self, ids: np.ndarray) -> np.ndarray:
        """Values of individual (layer, row) ids, for carried rows after a resume."""
        out = np.empty((len(ids), self.store.d_model), dtype=np.float32)
        for layer in np.unique(ids[:, 0]):
            mask = ids[:, 0] == layer
            rows = ids[mask, 1]
            block = self.store.layer_array(int(layer)).get_orthogonal_selection((rows, slice(None)))
            out[mask] = to_float32(block, self.store.dtype) * self.scales[int(layer)]
        return out

    def _open_window(self, carry_values: np.ndarray | None) -> None:
        window = self.window
        self._schedule(window)
        self._schedule(window + 1)  # decode the next window while this one trains
        parts = [future.result() for future in self._pending.pop(window)]
        if carry_values is None:
            carry_values = self._read_ids(self._carry_ids)
        values = np.concatenate([carry_values, *[p[0] for p in parts]])
        layers = np.concatenate([self._carry_ids[:, 0], *[p[1] for p in parts]])
        rows = np.concatenate([self._carry_ids[:, 1], *[p[2] for p in parts]])
        order = np.random.default_rng([self.seed, self.stream_id, window, 1]).permutation(len(values))
        n_batches = len(values) // self.batch_size
        self._current = {"values": torch.from_numpy(values), "layers": layers, "rows": rows, "order": order,
                         "n_batches": n_batches}

    def _next_host_batch(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        while True:
            if self._current is None:  # first batch, or just resumed: carried rows are re-read by id
                self._open_window(None)
            current = self._current
            if self.batch_in_window < current["n_batches"]:
                b = self.batch_in_window
                picked = current["order"][b * self.batch_size : (b + 1) * self.batch_size]
                self.batch_in_window += 1
                index = torch.from_numpy(picked)
                x = current["values"].index_select(0, index)
                return x, current["layers"][picked], current["rows"][picked]
            leftover = current["order"][current["n_batches"] * self.batch_size :]
            self._carry_ids = np.stack([current["layers"][leftover], current["rows"][leftover]], axis=1)
            carry_values = current["values"].numpy()[leftover]
            self.window, self.batch_in_window = self.window + 1, 0
            self._open_window(carry_values)

    # ------------------------------------------------------------------ batches
    def _to_device(self, x: torch.Tensor, layers: np.ndarray, rows: np.ndarray) -> tuple[Batch, Any]:
        if not self._cuda:
            return Batch(x, layers, rows), None
        pinned = x.pin_memory()
        with torch.cuda.stream(self._copy_stream):
            on_device = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return Batch(on_device, layers, rows), ready

    def next_batch(self) -> Batch:
        """The next batch; on CUDA the one after it is already being copied."""
        if self._ahead is None:
            self._ahead = self._to_device(*self._next_host_batch())
        batch, ready = self._ahead
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
            batch.x.record_stream(torch.cuda.current_stream(self.device))
            self._ahead_state = self._position()
            self._ahead = self._to_device(*self._next_host_batch())
        else:
            self._ahead = None
        return batch

    # ------------------------------------------------------------------ state
    def _position(self) -> dict[str, Any]:
        return {"window": int(self.window), "batch": int(self.batch_in_window), "carry": self._carry_ids.tolist()}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the next batch to hand out (a prefetched batch is handed out again)."""
        if self._ahead is not None and self._ahead_state is not None:
            return self._ahead_state
        return self._position()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.batch_in_window = int(state["window"]), int(state["batch"])
        self._carry_ids = np.asarray(state["carry"], dtype=np.int64).reshape(-1, 2)
        self._current, self._ahead, self._ahead_state = None, None, None
        self._pending.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
