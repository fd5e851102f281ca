"""Per-chunk statistics of stored activations (sums, row-norm sums, float16 overflow counts), taken where
the rows are (a GPU's memory in `gsae cache`) and kept per chunk so a resumed cache ends with the same totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stores.codecs import bit_round

if TYPE_CHECKING:  # imported where it is used: opening a store (`gsae info`, `gsae verify`) needs no torch
    import torch


FLOAT16_MAX = 65504.0


@dataclass
class ChunkStats:
    """Per-chunk partial statistics, kept so a resumed run ends with the same totals."""

    sums: np.ndarray  # float64 (n_layers, d_model): sum of stored rows
    norm_sums: np.ndarray  # float64 (n_layers,): sum of row L2 norms
    overflow: np.ndarray  # int64 (n_layers,): values clipped to the float16 range


class StatsAccumulator:
    """Per-layer statistics of one chunk's stored rows, added segment by segment.

    Sums run in float32 over blocks of 16 rows (exact for float16 inputs of similar magnitude) and in
    float64 across blocks; this keeps the cost at ~2% of SmolLM2's forward pass on 2 cores, where
    converting every value to float64 cost 8%.  Row norms are float32, summed in float64.
    """

    BLOCK = 16

    def __init__(self, n_layers: int, d_model: int, dtype: str, device: torch.device | str = "cpu",
                 keep_bits: int | None = None):
        """``keep_bits``: a lossy store's; the rows are bit-rounded first, as the store keeps them."""
        import torch

        self.dtype, self.keep_bits = dtype, keep_bits
        self.sums = torch.zeros(n_layers, d_model, dtype=torch.float64, device=device)
        self.norm_sums = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.overflow = torch.zeros(n_layers, dtype=torch.int64, device=device)
        self._host: tuple[torch.Tensor, ...] | None = None  # the read-back started by start_result

    def add(self, layer: int, stored: torch.Tensor) -> None:
        """Add rows of one layer, as stored (float16, bfloat16 bits as int16, or float32), on the
        accumulator's device: on a GPU nothing here waits for it (one transfer in ``result``)."""
        import torch  # (a look-up in sys.modules: under a µs against the sums' kernels)

        if self.keep_bits is not None:  # the statistics are of the stored values (docs/store-format.md)
            stored = bit_round(stored, self.keep_bits)
        values = stored.view(torch.bfloat16).float() if self.dtype == "bfloat16" else stored.float()
        full = values.shape[0] - values.shape[0] % self.BLOCK
        if full:
            blocks = values[:full].view(-1, self.BLOCK, values.shape[1]).sum(dim=1)
            self.sums[layer] += blocks.sum(dim=0, dtype=torch.float64)
        if full < values.shape[0]:
            self.sums[layer] += values[full:].sum(dim=0, dtype=torch.float64)
        self.norm_sums[layer] += torch.linalg.vector_norm(values, dim=1).sum(dtype=torch.float64)
        if self.dtype == "float16":
            if values.is_cuda:  # counted without reading anything back
                self.overflow[layer] += (values.abs() >= FLOAT16_MAX).sum()
            elif float(values.abs().amax()) >= FLOAT16_MAX:  # on a CPU one pass, the count only when needed
                self.overflow[layer] += int((values.abs() >= FLOAT16_MAX).sum())

    def start_result(self) -> None:
        """On a GPU, queue the copy of the sums to pinned host memory now (after the last rows' kernels):
        :meth:`result`, called once that work is done, then reads them without waiting for the device,
        where ``.cpu()`` would wait for everything queued since (the next batch's forward)."""
        if self.sums.is_cuda:
            self._host = tuple(t.to("cpu", non_blocking=True) for t in (self.sums, self.norm_sums, self.overflow))

    def result(self) -> ChunkStats:
        """The statistics (after :meth:`start_result`: once the device has done the copy it queued)."""
        if self._host is not None:
            return ChunkStats(*(t.numpy() for t in self._host))
        return ChunkStats(self.sums.cpu().numpy(), self.norm_sums.cpu().numpy(), self.overflow.cpu().numpy())


def compute_chunk_stats(layers: list[np.ndarray], dtype: str, keep_bits: int | None = None) -> ChunkStats:
    """Statistics of whole stored chunks (one array per layer), as the writer records them."""
    import torch

    accumulator = StatsAccumulator(len(layers), layers[0].shape[1], dtype, keep_bits=keep_bits)
    for layer, values in enumerate(layers):
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        accumulator.add(layer, tensor.view(torch.int16) if dtype == "bfloat16" else tensor)
    return accumulator.result()
