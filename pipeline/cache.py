"""Stage one: run the model once and write every block's residual stream to the activation store.

The forward pass runs on the calling thread, which also gathers the rows into chunks with their
statistics; compression and writing run on a pool of threads (every layer's chunk a job of its own,
several chunks in flight, bounded), so they overlap the next forward pass and use every core.  Chunks
are committed in order, one by one, which makes a killed run resumable to the same bytes (see
docs/store-format.md).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import transformers

from pipeline import __version__
from pipeline.corpus import Corpus, WindowPlan, iter_windows, open_corpus, window_plan
from pipeline.errors import GsaeError
from pipeline.models import LoadedModel, block_output, load_model, pick_device, resolve_model_spec
from pipeline.progress import make_progress
from stores import (
    FLOAT16_MAX,
    STORAGE_DTYPES,
    ActivationStore,
    ChunkStats,
    PendingChunk,
    StatsAccumulator,
    default_chunk_tokens,
    is_local,
    probe,
    read_seconds_writing,
    write_seconds_writing,
)

DEFAULT_TOKENS = 100_000
DEFAULT_CONTEXT_LENGTH = 256
DEFAULT_BATCH_SIZE = 16
CACHE_ROOT = "gsae-cache"


@dataclass
class CacheRequest:
    """Everything ``gsae cache`` was asked to do."""

    model: str | None = None
    revision: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    tokens: int = DEFAULT_TOKENS
    context_length: int = DEFAULT_CONTEXT_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    cache: str | None = None
    compression: str = "lossless"
    keep_bits: int | None = None
    dtype: str = "float16"
    device: str = "auto"
    prepend_bos: bool | None = None
    keep_bos: bool = False
    chunk_tokens: int | None = None
    write_threads: int | None = None  # None: one per core


@dataclass
class CacheResult:
    """What a ``gsae cache`` run produced, for the summary table."""

    path: str
    tokens_written: int
    tokens_planned: int
    n_layers: int
    d_model: int
    bytes_on_disk: int
    raw_bytes: int
    elapsed: float
    tokens_this_run: int
    resumed_from: int
    already_complete: bool = False
    corpus_exhausted: bool = False
    overflow_values: list[int] = field(default_factory=list)

    @property
    def bytes_per_value(self) -> float:
        return self.bytes_on_disk / max(1, self.tokens_written * self.n_layers * self.d_model)


def default_cache_path(slug: str) -> str:
    return os.path.join(CACHE_ROOT, slug)


def _validate(request: CacheRequest) -> None:
    if request.tokens <= 0:
        raise GsaeError(f"--tokens must be positive (got {request.tokens})")
    if request.batch_size <= 0:
        raise GsaeError(f"--batch-size must be positive (got {request.batch_size})")
    if request.context_length < 2:
        raise GsaeError(f"--context-length must be at least 2 (got {request.context_length})")
    if request.write_threads is not None and request.write_threads <= 0:
        raise GsaeError(f"--write-threads must be positive (got {request.write_threads})")
    if request.chunk_tokens is not None and request.chunk_tokens <= 0:
        raise GsaeError(f"--chunk-tokens must be positive (got {request.chunk_tokens})")
    if request.dtype not in STORAGE_DTYPES:
        raise GsaeError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got {request.dtype})")
    if request.compression not in {"lossless", "lossy"}:
        raise GsaeError(f"--compression must be lossless or lossy (got {request.compression})")
    if request.compression == "lossy" and request.dtype == "bfloat16":
        raise GsaeError("--compression lossy works with --dtype float16 or float32, not bfloat16")


def _prepare_folder(path: str) -> bool:
    """Create the cache folder if needed; True if this call created it."""
    if not is_local(path):
        return False
    folder = Path(path.removeprefix("file://"))
    existed = folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_file = folder / ".gsae-write-test"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as exc:
        raise GsaeError(f"cannot write the cache at {path}: {exc.strerror or exc}") from None
    return not existed


class _ForwardCapture:
    """Forward hooks on every block that hand back the stored rows of each block's output."""

    class _Stop(Exception):
        """Raised by the last block's hook: nothing after it is needed."""

    def __init__(self, lm: LoadedModel, first_row: int, dtype: str):
        self.lm = lm
        self.first_row = first_row  # 1 drops the BOS position
        self.dtype = dtype
        self.captured: list[torch.Tensor | None] = [None] * lm.n_layers
        self.pinned: list[torch.Tensor | None] = [None] * lm.n_layers  # reused device→host buffers
        self.overflowed = False
        self.handles = [block.register_forward_hook(self._hook(layer)) for layer, block in enumerate(lm.blocks)]

    def _hook(self, layer: int):
        last = layer == self.lm.n_layers - 1

        def hook(module: Any, inputs: Any, output: Any) -> None:
            self.captured[layer] = self._to_host(layer, block_output(output)[:, self.first_row :])
            if last:
                raise self._Stop

        return hook

    def _to_host(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.dtype == "float16":
            stored = hidden.to(torch.float16)
            if torch.isinf(stored).any():  # beyond the float16 range: clip, counted in the chunk stats
                self.overflowed = True
                stored.clamp_(-FLOAT16_MAX, FLOAT16_MAX)
        elif self.dtype == "bfloat16":
            stored = hidden.to(torch.bfloat16).view(torch.int16)
        else:
            stored = hidden.to(torch.float32)
        if stored.device.type == "cuda":  # async copy into a reused pinned buffer; synchronised in run()
            host = self.pinned[layer]
            if host is None or host.shape != stored.shape or host.dtype != stored.dtype:
                host = self.pinned[layer] = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
            host.copy_(stored, non_blocking=True)
            return host  # the assembler copies it into a chunk before the next forward overwrites it
        return stored

    def run(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            try:
                self.lm.model.base_model(input_ids=input_ids, use_cache=False)
            except self._Stop:
                pass
        if input_ids.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        captured, self.captured = self.captured, [None] * self.lm.n_layers
        return captured  # type: ignore[return-value]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _ChunkAssembler:
    """Collects rows from batches into whole chunks of the store, with their statistics.

    Statistics are computed here, on the forward thread with torch's threads, segment by segment:
    the segments of a chunk are the same in a resumed run, so the sums come out bit-identical."""

    def __init__(self, store: ActivationStore, np_dtype: np.dtype):
        self.store = store
        self.np_dtype = np_dtype
        self.next_chunk = store.chunks_written
        self.buffer: np.ndarray | None = None
        self.tokens: np.ndarray | None = None
        self.stats: StatsAccumulator | None = None
        self.filled = 0

    def add(self, layers: list[torch.Tensor], tokens: np.ndarray) -> Iterator[_Chunk]:
        position = 0
        while position < len(tokens):
            if self.buffer is None:
                start, stop = self.store.chunk_rows(self.next_chunk)
                self.buffer = np.empty((len(layers), stop - start, self.store.d_model), dtype=self.np_dtype)
                self.tokens = np.empty(stop - start, dtype=np.int32)
                self.stats = StatsAccumulator(len(layers), self.store.d_model, self.store.dtype)
                self.filled = 0
            take = min(len(tokens) - position, self.buffer.shape[1] - self.filled)
            target = torch.from_numpy(self.buffer)
            if self.store.dtype == "bfloat16":
                target = target.view(torch.int16)
            for layer, values in enumerate(layers):
                segment = values[position : position + take]
                target[layer, self.filled : self.filled + take].copy_(segment)
                self.stats.add(layer, segment)
            self.tokens[self.filled : self.filled + take] = tokens[position : position + take]
            self.filled += take
            position += take
            if self.filled == self.buffer.shape[1]:
                yield self._emit()

    def flush(self) -> _Chunk | None:
        """The last, short chunk when the corpus ran out before the planned tokens."""
        if self.buffer is None or self.filled == 0:
            return None
        self.buffer, self.tokens = self.buffer[:, : self.filled], self.tokens[: self.filled]
        return self._emit()

    def _emit(self) -> _Chunk:
        chunk = _Chunk(self.next_chunk, self.buffer, self.tokens, self.stats.result())
        self.next_chunk += 1
        self.buffer = self.tokens = self.stats = None
        return chunk


@dataclass
class _Chunk:
    index: int
    layers: np.ndarray  # (n_layers, rows, d_model) in the storage dtype
    tokens: np.ndarray
    stats: ChunkStats


class ChunkWriter:
    """Compresses and writes chunks on a pool of threads, every layer's chunk a job of its own, and
    commits them in order on the calling thread.  At most ``max_pending`` chunks are in flight: the
    forward pass waits (back-pressure) rather than letting memory grow."""

    def __init__(self, store: ActivationStore, threads: int, seconds_before: float):
        self.store, self.seconds_before = store, seconds_before
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gsae-writer")
        # enough chunks in flight to keep every thread busy, and at least two to overlap the forward
        self.max_pending = max(2, -(-2 * threads // (store.n_layers + 4)))
        self.pending: deque[PendingChunk] = deque()
        self.started = time.perf_counter()

    def submit(self, item: _Chunk) -> None:
        """Commit the chunks already written, start writing ``item``, and wait while too many are in flight."""
        # Commit first: a chunk that finished before ``item`` starts is committed before any of
        # ``item``'s writes can land, whatever the speed of the pool (a disk that fills up after a
        # commit then leaves exactly the chunks committed so far, see test_cache_errors).
        while self.pending and self.pending[0].done():
            self._commit_oldest()
        self.pending.append(self.store.start_chunk(item.index, list(item.layers), item.tokens, item.stats, self.pool))
        while len(self.pending) > self.max_pending:
            self._commit_oldest()

    def drain(self) -> None:
        while self.pending:
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        self.store.finish_chunk(self.pending.popleft())  # re-raises a write error (disk full) here
        # time spent producing activations so far, summed over resumed runs: the "A" of the paper's cost
        write_seconds_writing(self.store, self.seconds_before + time.perf_counter() - self.started)

    def close(self) -> None:
        for pending in self.pending:
            for future in pending.futures:
                future.cancel()
        self.pool.shutdown(wait=True)


def _attributes(request: CacheRequest, lm: LoadedModel, corpus: Corpus, plan: WindowPlan,
                rows_per_window: int, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store's descriptive attributes and the recipe that must match to resume."""
    tokenizer = lm.tokenizer
    recipe = {
        "model_id": lm.spec.model_id,
        "model_revision": lm.info.get("revision"),
        "model_fingerprint": lm.spec.fingerprint,
        "corpus_fingerprint": corpus.fingerprint,
        "context_length": request.context_length,
        "prepend_bos": plan.bos_token_id is not None,
        "bos_stored": rows_per_window == request.context_length,
        "batch_size": request.batch_size,
        "tokens_planned": request.tokens,
        "dtype": request.dtype,
        "compression": request.compression,
        "keep_bits": request.keep_bits,
        "chunk_tokens": request.chunk_tokens,
        "device": device.type,
    }
    attributes = {
        "gsae_version": __version__,
        "model_id": lm.spec.model_id,
        "model_source": lm.spec.kind,
        "model_revision": lm.info.get("revision"),
        "model_fingerprint": lm.spec.fingerprint,
        "model_config_sha256": lm.info.get("config_sha256"),
        "architecture": lm.architecture,
        "blocks_path": lm.blocks_path,
        "hook_point": "resid_post",
        "hook_name_template": "blocks.{layer}.hook_resid_post",
        "context_length": request.context_length,
        "rows_per_window": rows_per_window,
        "prepend_bos": plan.bos_token_id is not None,
        "bos_token_id": plan.bos_token_id,
        "bos_stored": rows_per_window == request.context_length,
        "separator_token_id": plan.separator_token_id,
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer),
        },
        "corpus": {
            "spec": corpus.spec, "kind": corpus.kind, "description": corpus.description,
            "fingerprint": corpus.fingerprint, "text_field": request.text_field,
            "split": request.split if corpus.kind == "hub" else None,
            "config": request.dataset_config if corpus.kind == "hub" else None,
        },
        "batch_size": request.batch_size,
        "device": device.type,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "recipe": recipe,
    }
    return attributes, recipe


def _check_recipe(path: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    for key in wanted:
        if stored.get(key) != wanted[key]:
            raise GsaeError(
                f"{path} holds a cache made with other settings ({key}: {stored.get(key)!r} there, "
                f"{wanted[key]!r} now); re-run the original command to resume it, or choose another --cache"
            )


class _TokenCheck:
    """On resume, compares the regenerated tokens of already-written rows with the stored ones,
    so a changed corpus or tokenizer is caught instead of mixing two caches."""

    def __init__(self, store: ActivationStore, block: int = 1 << 16):
        self.store = store
        self.position = 0
        self.limit = store.tokens_written
        self.block = block
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def feed(self, tokens: np.ndarray) -> None:
        tokens = tokens[: self.limit - self.position - self.pending_rows]
        if len(tokens):
            self.pending.append(tokens)
            self.pending_rows += len(tokens)
        if self.pending_rows >= self.block or self.position + self.pending_rows >= self.limit:
            self._compare()

    def _compare(self) -> None:
        if not self.pending_rows:
            return
        regenerated = np.concatenate(self.pending)
        stored = self.store.tokens(self.position, self.position + len(regenerated))
        if not np.array_equal(regenerated, stored):
            row = self.position + int(np.argmax(regenerated != stored))
            raise GsaeError(
                f"{self.store.path} was made from other tokens (first difference at row {row:,}); the corpus "
                "or tokenizer changed since, so it cannot be resumed: choose another --cache"
            )
        self.position += len(regenerated)
        self.pending, self.pending_rows = [], 0


def _corpus_too_short_error(corpus: Corpus, tokenizer: Any, plan: WindowPlan) -> GsaeError:
    n_tokens = 0
    for document in corpus.documents():
        for piece in document:
            n_tokens += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
    if n_tokens == 0:
        return GsaeError(f"corpus {corpus.spec} holds no text")
    return GsaeError(
        f"corpus {corpus.spec} has {n_tokens:,} tokens, fewer than one window of {plan.context_length} "
        "(lower --context-length or give more text)"
    )


def build_cache(request: CacheRequest, console: Any) -> CacheResult:
    """Stage one. Creates or resumes the store and fills it; returns what was done."""
    _validate(request)
    spec = resolve_model_spec(request.model, request.revision)
    path = request.cache or default_cache_path(spec.slug)
    state = probe(path)
    created_folder = _prepare_folder(path) if state == "absent" else False
    store: ActivationStore | None = None
    try:
        corpus = open_corpus(request.dataset, text_field=request.text_field, split=request.split,
                             config=request.dataset_config)
        device = pick_device(request.device)
        with console.status(f"loading {spec.model_id} ..."):
            lm = load_model(spec, device)
        plan = window_plan(lm.tokenizer, request.context_length, request.prepend_bos)
        first_row = 1 if plan.bos_token_id is not None and not request.keep_bos else 0
        rows_per_window = request.context_length - first_row
        attributes, recipe = _attributes(request, lm, corpus, plan, rows_per_window, device)

        windows = iter_windows(corpus, lm.tokenizer, plan)
        first_window = next(windows, None)
        if first_window is None:
            raise _corpus_too_short_error(corpus, lm.tokenizer, plan)
        windows = itertools.chain([first_window], windows)

        if state == "store":
            store = ActivationStore.open(path, mode="r+", allow_partial=True)
            _check_recipe(path, store.attrs.get("recipe", {}), recipe)
            if store.complete:
                return _result(store, 0.0, 0, store.tokens_written, already_complete=True)
            store.remove_stale_temporaries()
        else:
            chunk_tokens = request.chunk_tokens or default_chunk_tokens(lm.d_model, request.dtype)
            store = ActivationStore.create(
                path, n_layers=lm.n_layers, d_model=lm.d_model, n_tokens=request.tokens,
                chunk_tokens=chunk_tokens, dtype=request.dtype, compression=request.compression,
                keep_bits=request.keep_bits, attributes=attributes,
            )
        return fill_store(store, lm, windows, batch_size=request.batch_size, first_row=first_row,
                          rows_per_window=rows_per_window, console=console, write_threads=request.write_threads)
    finally:
        if store is None and created_folder:
            _remove_if_empty(path)


def _remove_if_empty(path: str) -> None:
    try:
        Path(path).rmdir()
    except OSError:
        pass


def fill_store(store: ActivationStore, lm: LoadedModel, windows: Iterator[list[int]], *, batch_size: int,
               first_row: int, rows_per_window: int, console: Any, write_threads: int | None = None) -> CacheResult:
    """Run ``windows`` through the model in batches and write the stored rows until the store holds
    its planned tokens or the windows run out; resumes after the rows already committed."""
    start_row = store.tokens_written
    batch = batch_size
    # Resume at the batch that holds the first unwritten row, with the same batch boundaries as the
    # first run: the forward pass then sees identical inputs and produces identical bytes.
    first_batch = (start_row // rows_per_window) // batch
    skip_rows = start_row - first_batch * batch * rows_per_window
    check = _TokenCheck(store)
    for window in itertools.islice(windows, first_batch * batch):
        check.feed(np.asarray(window[first_row:], dtype=np.int32))

    np_dtype = np.dtype(STORAGE_DTYPES[store.dtype][0])
    assembler = _ChunkAssembler(store, np_dtype)
    capture = _ForwardCapture(lm, first_row, store.dtype)
    seconds_before = read_seconds_writing(store) or 0.0
    writer = ChunkWriter(store, write_threads or os.cpu_count() or 1, seconds_before)
    rows_done = start_row
    exhausted = False
    started = time.perf_counter()

    progress = make_progress(console)
    try:
        with progress:
            task = progress.add_task("caching", total=store.tokens_planned, completed=start_row)
            while rows_done < store.tokens_planned:
                group = list(itertools.islice(windows, batch))
                if len(group) < batch and not group:
                    exhausted = True
                    break
                input_ids = torch.tensor(group, dtype=torch.long, device=lm.device)
                layers = capture.run(input_ids)
                tokens = input_ids[:, first_row:].reshape(-1).to(torch.int32).cpu().numpy()
                if skip_rows:
                    check.feed(tokens[:skip_rows])
                    layers = [values[skip_rows:] for values in layers]
                    tokens, skip_rows = tokens[skip_rows:], 0
                keep = min(len(tokens), store.tokens_planned - rows_done)
                for item in assembler.add([values[:keep] for values in layers], tokens[:keep]):
                    writer.submit(item)
                rows_done += keep
                progress.update(task, completed=rows_done)
                if len(group) < batch:
                    exhausted = rows_done < store.tokens_planned
                    break
            if exhausted and (last := assembler.flush()) is not None:
                writer.submit(last)
            writer.drain()
    finally:
        capture.close()
        writer.close()
    if store.tokens_written == 0:
        raise GsaeError("the corpus gave no rows to write")
    store.finalize()
    elapsed = time.perf_counter() - started
    write_seconds_writing(store, seconds_before + elapsed)
    return _result(store, elapsed, rows_done - start_row, start_row, corpus_exhausted=exhausted)


def _result(store: ActivationStore, elapsed: float, tokens_this_run: int, resumed_from: int,
            **flags: bool) -> CacheResult:
    return CacheResult(
        path=store.path, tokens_written=store.tokens_written, tokens_planned=store.tokens_planned,
        n_layers=store.n_layers, d_model=store.d_model, bytes_on_disk=store.nbytes_on_disk(),
        raw_bytes=store.raw_activation_bytes(), elapsed=elapsed, tokens_this_run=tokens_this_run,
        resumed_from=resumed_from, overflow_values=list(store.attrs.get("overflow_values", [])), **flags,
    )
