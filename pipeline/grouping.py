"""Stage two (a): layer distances, contiguous complete-linkage groups and the AMAD curve.

Definitions (docs/grouping.md, DESIGN section 1): with x̃ = x − μ (μ the layer's exact mean),
d_t(i, j) = arccos(clamp(cos(x̃_i,t, x̃_j,t), −1, 1)) / π and D[i, j] is its mean over the sampled
tokens.  AMAD(G) = mean over groups of the largest D inside the group (a singleton counts 0).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import GsaeError
from pipeline.models import pick_device
from stores import ActivationStore, StoreError
from stores.activation_store import absolute_url
from stores.held_out import split_chunks
from stores.remote import describe_storage_error

_ROWS_PER_STEP = 256  # rows normalised at a time inside a chunk task: bounds its memory
# on a GPU: at most this many chunk tasks of a process at once (Dask runs one per core), each with float64
# buffers of at most _GPU_STEP_BYTES besides its chunk in the stored dtype, so that memory does not grow
# with the host's cores or the model's size (80 layers of d 8,192: 2 × (335 MB of chunk + 256 MB))
_GPU_TASKS = threading.BoundedSemaphore(2)
_GPU_STEP_BYTES = 256 * 2**20


def default_layers(n_layers: int) -> list[int]:
    """The layers grouped and trained by default: every block but the last (the paper leaves it out)."""
    return list(range(n_layers - 1))


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``--layers``: ``0-27``, ``0,2,4`` or ``0-10,12``; default :func:`default_layers`."""
    if spec is None:
        layers = default_layers(n_layers)
    else:
        layers = []
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise GsaeError(f"--layers {spec!r}: use ranges and lists such as 0-27 or 0,2,4")
            low, high = int(match[1]), int(match[2] or match[1])
            if high < low:
                raise GsaeError(f"--layers {spec!r}: range {low}-{high} runs backwards")
            layers.extend(range(low, high + 1))
        repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
        if repeated:
            raise GsaeError(f"--layers {spec!r}: layer {repeated[0]} is given twice; name each layer once")
        layers = sorted(layers)
        out_of_range = [layer for layer in layers if layer >= n_layers]
        if out_of_range:
            raise GsaeError(f"--layers {spec!r}: the cache has layers 0-{n_layers - 1}, not "
                            f"{', '.join(map(str, out_of_range[:5]))}{' ...' if len(out_of_range) > 5 else ''}")
    if len(layers) < 2:
        if spec is None and n_layers >= 2:  # a 2-block model: the default leaves its last block out
            raise GsaeError(f"grouping needs at least two layers, and the default leaves out the last of this "
                            f"model's {n_layers} blocks (as the paper does); pass --layers 0-{n_layers - 1} (to gsae "
                            "group or gsae run) to group them all")
        raise GsaeError(f"grouping needs at least two layers (got {len(layers)}"
                        + (f": the cache has {n_layers} block)" if n_layers < 2 else ")"))
    return layers


def layer_span(layers: list[int], dash: str = "-", separator: str = ",") -> str:
    """Sorted layers as text, runs of consecutive ones as ranges: ``3``, ``0-19``, ``0,2,4`` (groups over a
    ``--layers`` subset are contiguous in the subset, not in the model), ``0-2,5``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return separator.join(f"{run[0]}{dash}{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)


def partition_text(groups: list[list[int]], separator: str = ", ") -> str:
    """A partition as users read it: ``[0–3], [4], [5–9]``."""
    return separator.join(f"[{layer_span(group, '–')}]" for group in groups)


def sampled_from(store: ActivationStore) -> list[int]:
    """The chunks the grouping samples: the training chunks, so that the layers' distances (and so the
    partitions, G* and the AMAD of each) are not measured on the rows runs are evaluated on; all of a cache
    of one chunk."""
    return split_chunks(store)[0] if store.n_chunks >= 2 else list(range(store.n_chunks))


def sample_chunks(store: ActivationStore, tokens: int, seed: int) -> list[int]:
    """Whole chunks of :func:`sampled_from` drawn at random (seeded) until they hold ``tokens`` rows; sorted."""
    candidates = sampled_from(store)
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen, rows = [], 0
    for chunk in (candidates[i] for i in order):
        if rows >= tokens:
            break
        start, stop = store.readable_rows(int(chunk))
        chosen.append(int(chunk))
        rows += stop - start
    return sorted(chosen)


def _chunk_distance_sums(mean: np.ndarray, dtype: str, *blocks: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Sum over one chunk's tokens of d_t(i, j); ``blocks`` are that chunk of each layer as stored
    (rows, d); ``device``: where the products run. Returns (1, n, n) float64.

    On the CPU, centring, normalising and the per-token Gram matrices run in float32 (float64 made the
    task 3× slower, mostly in memory traffic); the arccos and the sums run in float64.  Against a float64
    NumPy computation the result agrees to ~1e-7 on typical rows and to ~3e-5 for nearly opposite
    vectors, where arccos amplifies float32 rounding (tests/test_group.py asserts 1e-4).  On CUDA all of
    it runs in float64: a GPU has the throughput, and float32 products there would follow torch's global
    TF32 switch (10-bit mantissas: ~1e-3 in a cosine near 1 is ~0.05 rad), which a Dask thread cannot
    safely flip for itself.  A layer whose centred rows are all zero is at distance 0.5 from every other
    (its cosines count as 0)."""
    n_layers, rows = len(blocks), blocks[0].shape[0]
    where = torch.device(device)
    on_gpu = where.type == "cuda"
    if rows == 0:
        return np.zeros((1, n_layers, n_layers))
    with _GPU_TASKS if on_gpu else contextlib.nullcontext():
        return _distance_sums_on(where, mean, dtype, blocks)


def _distance_sums_on(where: torch.device, mean: np.ndarray, dtype: str, blocks: tuple[np.ndarray, ...]) -> np.ndarray:
    n_layers, rows, width = len(blocks), blocks[0].shape[0], blocks[0].shape[1]
    on_gpu = where.type == "cuda"
    total = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=where)
    compute = torch.float64 if on_gpu else torch.float32
    step = min(rows, max(1, _GPU_STEP_BYTES // (8 * n_layers * (width + n_layers))) if on_gpu else _ROWS_PER_STEP)
    centre = torch.from_numpy(mean).to(where, compute)
    sources = [(torch.from_numpy(b) if dtype != "bfloat16" else torch.from_numpy(b).view(torch.bfloat16)).to(where)
               for b in blocks]  # on a GPU: each layer's chunk crosses once, in its stored dtype
    # One set of buffers for every step, filled in place: fresh (256, 29, 576) float32 tensors per step
    # (stack, convert, subtract) cost 15 ms of page faults against 4 ms of Gram matrices (SmolLM2, this
    # CPU). Layer-major, so that each layer converts and centres contiguously: 1.1 instead of 2.0 ms a
    # step interleaved, and the products read it as fast through a transposed view.
    # Not padded with zero layers to a multiple of 8: that made the batched product 1.2-2.7x faster on
    # the CPU of the machine this was written on at some n, and up to 2.8x slower on the GPU machine's
    # (benchmarks/group_speed.py --gram-sweep; docs/benchmarks.md, "gsae group").
    centred = torch.empty(n_layers, step, width, dtype=compute, device=where)
    gram = torch.empty(step, n_layers, n_layers, dtype=compute, device=where)
    cosine = gram if compute == torch.float64 else torch.empty(step, n_layers, n_layers, dtype=torch.float64)
    for start in range(0, rows, step):
        size = min(step, rows - start)
        for layer, source in enumerate(sources):
            target = centred[layer, :size]
            target.copy_(source[start : start + size])
            target.sub_(centre[layer])
        tokens = centred[:, :size].transpose(0, 1)  # (size, n, d)
        torch.bmm(tokens, tokens.transpose(1, 2), out=gram[:size])
        products = cosine[:size] if cosine is gram else cosine[:size].copy_(gram[:size])  # normalised after: one pass less
        inverse_norm = products.diagonal(dim1=1, dim2=2).clamp_min(1e-30).rsqrt()
        products.mul_(inverse_norm[:, :, None]).mul_(inverse_norm[:, None, :]).clamp_(-1.0, 1.0)
        total += torch.arccos_(products).sum(dim=0)
    total /= math.pi
    total.fill_diagonal_(0.0)
    return total.cpu().numpy()[None, :, :]


@functools.lru_cache(maxsize=8)
def _opened(url: str, allow_partial: bool, n_tokens: int) -> tuple[ActivationStore, np.ndarray]:
    """A store and its per-layer means, opened once per process (a Dask worker opens it by URL);
    ``n_tokens`` is part of the key so a store that has grown since is opened again."""
    store = ActivationStore.open(url, allow_partial=allow_partial)
    return store, store.mean


def _chunk_task(url: str, layers: list[int], chunk: int, allow_partial: bool, n_tokens: int,
                device: str) -> np.ndarray:
    """One chunk's (n, n) distance sums, read where the task runs: the graph carries the store's URL,
    never activations, nor credentials (they come from the worker's environment).  ``device`` ``auto``
    is the worker's GPU where it has one."""
    where = pick_device(device).type  # on a Dask worker too: `cuda` without one is refused by name, before any read
    store, mean = _opened(url, allow_partial, n_tokens)
    start, stop = store.readable_rows(chunk)
    blocks = [store.read_rows(layer, start, stop) for layer in layers]
    return _chunk_distance_sums(mean[layers], store.dtype, *blocks, device=where)[0]


def distance_matrix(store: ActivationStore, layers: list[int], chunks: list[int], device: str = "cpu") -> np.ndarray:
    """D over the rows of ``chunks``: a Dask graph with one partial sum per chunk, reduced by Dask.

    Each task reads one chunk of every selected layer through the store (so a corrupt chunk is named
    like everywhere else) and works through it 256 rows at a time, so memory does not depend on how
    many chunks are sampled; Dask's tree reduction sums the partial sums."""
    import dask  # imported here: `gsae train` reads groupings without loading dask
    import dask.array as da

    n = len(layers)
    task = dask.delayed(_chunk_task, pure=True)
    url = absolute_url(store.path)  # a relative path named another folder, or none, on a worker started elsewhere
    parts = [da.from_delayed(task(url, list(layers), chunk, not store.complete, store.n_tokens, device), shape=(n, n),
                             dtype=np.float64) for chunk in chunks]
    n_rows = sum(stop - start for start, stop in map(store.readable_rows, chunks))
    distance = np.asarray(da.stack(parts).sum(axis=0, dtype=np.float64).compute()) / n_rows
    return (distance + distance.T) / 2  # exact symmetry; the two halves agree to rounding


# --------------------------------------------------------------------------- partitions
def contiguous_agglomeration(distance: np.ndarray) -> dict[int, list[list[int]]]:
    """Contiguous complete-linkage agglomeration (DESIGN section 1): the partition for every G, positions 0..n-1.

    Start from singletons; repeatedly merge the adjacent pair of clusters whose complete-linkage
    distance (the largest D between a member of one and a member of the other) is smallest, ties to
    the lower index.  Hand-written on purpose: scikit-learn's AgglomerativeClustering with a chain
    ``connectivity`` only ever compares connected pairs, so on a chain it cuts at the largest adjacent
    distances instead (scikit-learn issue #23550); n is a few hundred layers at most, so this O(n³) loop
    is instant."""
    n = distance.shape[0]
    groups = [[i] for i in range(n)]
    partitions = {n: [list(g) for g in groups]}
    while len(groups) > 1:
        links = [distance[np.ix_(a, b)].max() for a, b in zip(groups, groups[1:])]
        best = int(np.argmin(links))  # the first minimum: ties go to the lower layer index
        groups[best : best + 2] = [groups[best] + groups[best + 1]]
        partitions[len(groups)] = [list(g) for g in groups]
    return partitions


def contiguous_partition(distance: np.ndarray, n_groups: int) -> list[list[int]]:
    """The ``n_groups``-group partition of :func:`contiguous_agglomeration`; positions 0..n-1."""
    return contiguous_agglomeration(distance)[n_groups]


def uniform_partition(n: int, n_groups: int) -> list[list[int]]:
    """Equal contiguous splits (sizes differ by at most one): the paper's control."""
    return [part.tolist() for part in np.array_split(np.arange(n), n_groups)]


def amad(distance: np.ndarray, groups: list[list[int]]) -> float:
    """Average over groups of the maximum angular distance inside each group."""
    return float(np.mean([distance[np.ix_(g, g)].max() if len(g) > 1 else 0.0 for g in groups]))


@dataclass
class Grouping:
    """The result of ``gsae group``: what is written to ``<cache>/groups/<metric>.json``."""

    metric: str
    layers: list[int]
    distance: np.ndarray
    threshold: float
    curve: list[dict[str, Any]]  # {"n_groups", "amad", "groups" (layer indices)}
    chosen: int
    sample: dict[str, Any]

    def point(self, n_groups: int) -> dict[str, Any]:
        """The curve's entry for ``n_groups``: its partition and AMAD."""
        for point in self.curve:
            if point["n_groups"] == n_groups:
                return point
        raise GsaeError(f"no partition with {n_groups} groups (1 to {len(self.layers)} exist)")

    def groups_for(self, n_groups: int) -> list[list[int]]:
        return self.point(n_groups)["groups"]

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "layers": self.layers, "distance": self.distance.round(8).tolist(),
            "threshold": self.threshold, "curve": self.curve, "chosen": self.chosen, "sample": self.sample,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Grouping":
        """The grouping of a ``groups/<metric>.json`` record; ValueError, saying what is wrong, for a record
        that lacks a field or whose fields do not fit together (a damaged or hand-edited file)."""
        missing = [key for key in ("metric", "layers", "distance", "threshold", "curve", "chosen", "sample")
                   if key not in data]
        if missing:
            raise ValueError(f"no {missing[0]!r} field")
        layers, curve, chosen = data["layers"], data["curve"], data["chosen"]
        try:
            distance = np.asarray(data["distance"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("'distance' is not a matrix of numbers") from None
        if not isinstance(layers, list) or not all(isinstance(layer, int) for layer in layers):
            raise ValueError("'layers' is not a list of layer indices")
        if distance.shape != (len(layers), len(layers)):
            raise ValueError(f"'distance' is not {len(layers)} × {len(layers)}")
        if not isinstance(curve, list) or not all(isinstance(point, dict) and {"n_groups", "amad", "groups"} <= set(point)
                                                  for point in curve):
            raise ValueError("'curve' is not a list of {n_groups, amad, groups} entries")
        if not any(point["n_groups"] == chosen for point in curve):
            raise ValueError(f"'chosen' ({chosen!r}) is not a G of the curve")
        if not isinstance(data["sample"], dict):
            raise ValueError("'sample' is not an object")
        return cls(data["metric"], layers, distance, data["threshold"], curve, chosen, data["sample"])


def build_grouping(metric: str, layers: list[int], distance: np.ndarray, threshold: float,
                   sample: dict[str, Any]) -> Grouping:
    """Partitions for every G, their AMAD, and G* = the smallest G with AMAD < threshold."""
    n = len(layers)
    agglomeration = contiguous_agglomeration(distance) if metric == "amad" else None
    curve = []
    for n_groups in range(1, n + 1):
        positions = agglomeration[n_groups] if agglomeration else uniform_partition(n, n_groups)
        curve.append({"n_groups": n_groups, "amad": round(amad(distance, positions), 8),
                      "groups": [[layers[p] for p in group] for group in positions]})
    chosen = next(point["n_groups"] for point in curve if point["amad"] < threshold)
    return Grouping(metric, layers, distance, threshold, curve, chosen, sample)


def compute_distances(store: ActivationStore, layers: list[int], tokens: int, seed: int,
                      scheduler: str | None = None, device: str = "cpu") -> tuple[np.ndarray, dict[str, Any]]:
    """Sample chunks and compute D; returns D and a description of the sample.  ``device``: where each
    task's products run (``auto``: the GPU of the process, or of each Dask worker, where there is one)."""
    chunks = sample_chunks(store, tokens, seed)
    ranges = [list(store.readable_rows(c)) for c in chunks]
    if scheduler:
        try:
            from dask.distributed import Client
        except ImportError:
            raise GsaeError("--scheduler needs dask.distributed: pip install 'dask[distributed]'") from None
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, ValueError) as exc:  # ValueError: an address distributed cannot parse
            raise GsaeError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            try:
                distance = distance_matrix(store, layers, chunks, device)
            except (StoreError, GsaeError) as exc:  # raised where a task ran: the worker may see another file
                # system, or have no GPU; kept as it is (an incomplete cache's line names the command that finishes it)
                exc.args = (f"on a Dask worker: {exc}", *exc.args[1:])
                raise
            except Exception as exc:  # the worker's credentials: its environment's, never --storage-option's
                storage = describe_storage_error(exc, hint="a Dask worker takes credentials and endpoint from its own "
                                                           "environment, not from --storage-option")
                if storage is None:
                    raise
                raise GsaeError(f"on a Dask worker: {storage}") from None
    else:
        import dask

        with dask.config.set(scheduler="threads"):
            distance = distance_matrix(store, layers, chunks, device)
    sample = {"seed": seed, "tokens": int(sum(b - a for a, b in ranges)), "chunks": chunks, "row_ranges": ranges}
    return distance, sample
