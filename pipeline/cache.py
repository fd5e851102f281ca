"""Stage one: run the model once and write every block's residual stream to the activation store.

The forward pass runs on the calling thread, which also gathers the rows into chunks with their
statistics (:mod:`pipeline.capture`); compression and writing (:mod:`pipeline.chunk_writer`) run on a pool of threads (every layer's chunk a job of its own,
several chunks in flight, bounded), so they overlap the next forward pass and use every core; with
``--writer processes`` the layers' chunks go to encoder processes instead (:mod:`stores.chunk_files`),
whose GIL is not the model thread's.  On a GPU the next batch runs while the host hands the last one's
chunks to the writer.  Chunks are committed in order, which makes a killed run resumable to the same bytes
(see docs/store-format.md).

Under torchrun (``torchrun --nproc-per-node N gsae cache ...``) every rank runs this: rank 0 creates or
checks the store, then each rank writes a contiguous range of chunks, committing each with a marker,
and rank 0 finalizes after a barrier.  Every rank cuts the corpus into the same windows and runs the
same forward batches as one process would, skipping the batches that hold none of its rows, so the
store is byte-identical to one written by a single process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import itertools
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Iterator

import fsspec
import numpy as np
import torch

from pipeline import __version__
from pipeline.capture import ChunkAssembler, ForwardCapture
from pipeline.chunk_writer import ChunkWriter, chunk_bytes
from pipeline.corpus import (Corpus, WindowPlan, check_corpus_options, check_has_text, iter_windows, open_corpus,
                             window_plan)
from pipeline.errors import GsaeError
from pipeline.models import (LoadedModel, ModelSpec, load_model, matmul_precision, max_positions,
                             pick_device, resolve_model_spec)
from pipeline.processes import start_processes, worker_nice
from pipeline.progress import make_progress
from pipeline.ranks import Ranks, current as current_ranks
from pipeline.requests import CACHE_ROOT, WORKER_KINDS, CacheRequest
from stores import (
    STORAGE_DTYPES,
    ActivationStore,
    IncompleteCache,
    default_chunk_tokens,
    is_local,
    probe,
    read_seconds_writing,
    write_seconds_writing,
)
from stores.activation_store import fold_seconds_writing, writer_lock_file
from stores.codecs import keep_bits_range
from stores.locks import exclusive, missing_folders
from stores.held_out import HELD_OUT_FRACTION, held_out_chunks


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
    activation_bytes: int = 0  # of bytes_on_disk, those of the activations (layers/), as `gsae info` counts
    already_complete: bool = False
    corpus_exhausted: bool = False
    overflow_values: list[int] = field(default_factory=list)
    rank: int = 0  # under torchrun rank 0 reports for every rank; the others print nothing
    chunking_note: str = ""  # where the corpus ran out: what its chunks, sized for --tokens, mean for training
    seconds_made: float | None = None  # an already complete cache: the seconds its making took (timing.json)
    phases: dict[str, float] = field(default_factory=dict)  # this run's seconds by phase (rank 0's; see fill_store)
    writer: str = ""  # who wrote the chunks, e.g. "16 processes" (empty when nothing was written)
    # (seconds since the start, rows run through the model so far) after each batch has gone to the writer:
    # the steady pace, start-up and the writer's last chunks left out (benchmarks/cache_throughput.py)
    timeline: list[tuple[float, int]] = field(default_factory=list)
    load_seconds: float = 0.0  # loading the model, before ``elapsed`` (the summary showed only the caching's time)

    @property
    def bytes_per_value(self) -> float:
        """The activations' bytes per stored value (tokens, statistics and groupings left out)."""
        return self.activation_bytes / max(1, self.tokens_written * self.n_layers * self.d_model)


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
    if request.writer not in WORKER_KINDS:
        raise GsaeError(f"--writer {request.writer!r}: choose one of {', '.join(WORKER_KINDS)}")
    if request.writer == "processes" and (request.compression != "lossless"
                                          or (request.cache is not None and not is_local(request.cache))):
        # before the model loads (SmolLM2: 45 s here); pipeline.processes says the same of an existing store
        raise GsaeError("--writer processes needs a lossless cache on a local disk; pass --writer threads")
    if request.chunk_tokens is not None and request.chunk_tokens <= 0:
        raise GsaeError(f"--chunk-tokens must be positive (got {request.chunk_tokens})")
    if request.dtype not in STORAGE_DTYPES:
        raise GsaeError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got {request.dtype})")
    if request.compression not in {"lossless", "lossy"}:
        raise GsaeError(f"--compression must be lossless or lossy (got {request.compression})")
    if request.compression == "lossy" and request.dtype == "bfloat16":
        raise GsaeError("--compression lossy works with --dtype float16 or float32, not bfloat16")
    if request.compression == "lossless" and request.keep_bits is not None:
        raise GsaeError("--keep-bits sets the mantissa bits of --compression lossy; a lossless cache keeps them all")
    check_corpus_options(request.dataset, text_field=request.text_field, split=request.split,
                         config=request.dataset_config)
    bits = keep_bits_range(request.dtype)  # the codecs' own rule, checked before any folder is made
    if request.compression == "lossy" and request.keep_bits is not None and request.keep_bits not in bits:
        raise GsaeError(f"--keep-bits must be from 0 to {bits[-1]} for {request.dtype} (got {request.keep_bits})")


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


def _to_device(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """The batch's token ids where the model runs.  To a GPU through pinned memory, without waiting: a copy
    from pageable memory makes torch wait for everything queued (the last batch's forward), and the next
    batch could not be queued before that one was done."""
    tensor = torch.from_numpy(ids)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _attributes(request: CacheRequest, lm: LoadedModel, corpus: Corpus, plan: WindowPlan,
                rows_per_window: int, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store's descriptive attributes and the recipe that must match to resume."""
    tokenizer = lm.tokenizer
    recipe = _recipe(request, lm.spec, lm.info.get("revision"), corpus, plan.bos_token_id is not None,
                     rows_per_window == request.context_length, device)
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
            "bos_token_id": getattr(tokenizer, "bos_token_id", None),  # its own, prepended or not (a re-run reads it)
        },
        "corpus": {
            "spec": corpus.spec, "kind": corpus.kind, "description": corpus.description,
            "fingerprint": corpus.fingerprint, "path": corpus.path, "text_field": request.text_field,
            "split": request.split if corpus.kind == "hub" else None,
            "config": request.dataset_config if corpus.kind == "hub" else None,
        },
        "batch_size": request.batch_size,
        "device": device.type,
        "torch_version": torch.__version__,
        "transformers_version": importlib.metadata.version("transformers"),
        "recipe": recipe,
    }
    return attributes, recipe


def _recipe(request: CacheRequest, spec: ModelSpec, revision: str | None, corpus: Corpus, prepend_bos: bool,
            bos_stored: bool, device: torch.device) -> dict[str, Any]:
    """The settings that must match for a re-run to resume a store (its ``recipe`` attribute)."""
    return {
        "model_id": spec.model_id,
        "model_revision": revision,
        "model_fingerprint": spec.fingerprint,
        "corpus_fingerprint": corpus.fingerprint,
        "context_length": request.context_length,
        "prepend_bos": prepend_bos,
        "bos_stored": bos_stored,
        "batch_size": request.batch_size,
        "tokens_planned": request.tokens,
        "dtype": request.dtype,
        "compression": request.compression,
        "keep_bits": request.keep_bits,
        "chunk_tokens": request.chunk_tokens,
        "device": device.type,
    }


def cache_command(path: str, attrs: dict[str, Any]) -> str | None:
    """The `gsae cache` command that continues the cache at ``path`` (from its stored recipe and corpus
    options), shell-quoted; None where the store predates a recipe.  Storage options are left out: gsae never
    writes them anywhere."""
    recipe, corpus = attrs.get("recipe"), attrs.get("corpus") or {}
    if not isinstance(recipe, dict) or not isinstance(corpus, dict):
        return None
    words = ["gsae", "cache"]
    source, model = attrs.get("model_source"), recipe.get("model_id")
    if source != "embedded" and model:
        words += ["--model", model]
    fingerprint = str(recipe.get("model_fingerprint") or "")
    if source == "hub" and not fingerprint.endswith("@main"):  # the revision asked for (hub:<id>@<revision>)
        words += ["--revision", fingerprint.rpartition("@")[2]]
    if corpus.get("spec") and corpus.get("kind") != "pydoc":  # a local one by its absolute path: from anywhere
        words += ["--dataset", corpus.get("path") or corpus["spec"]]
    if corpus.get("config"):
        words += ["--dataset-config", corpus["config"]]
    if corpus.get("split") not in (None, CacheRequest.split):
        words += ["--split", corpus["split"]]
    if corpus.get("text_field") not in (None, CacheRequest.text_field):
        words += ["--text-field", corpus["text_field"]]
    words += ["--cache", path, "--tokens", str(recipe["tokens_planned"]),
              "--context-length", str(recipe["context_length"]), "--batch-size", str(recipe["batch_size"])]
    if recipe.get("chunk_tokens") is not None:
        words += ["--chunk-tokens", str(recipe["chunk_tokens"])]
    if recipe.get("dtype") not in (None, CacheRequest.dtype):
        words += ["--dtype", recipe["dtype"]]
    if recipe.get("compression") not in (None, CacheRequest.compression):
        words += ["--compression", recipe["compression"]]
    if recipe.get("keep_bits") is not None:
        words += ["--keep-bits", str(recipe["keep_bits"])]
    if recipe.get("prepend_bos") is False:
        words += ["--no-prepend-bos"]
    elif recipe.get("bos_stored"):
        words += ["--keep-bos"]
    if recipe.get("device") and recipe["device"] != pick_device("auto").type:  # what auto would not pick here
        words += ["--device", recipe["device"]]
    return shlex.join(words)


def incomplete_cache_message(error: IncompleteCache) -> str:
    """``error``'s message with the command that finishes the cache in place of "its `gsae cache` command"."""
    command = cache_command(error.path, error.attrs)
    message = str(error)
    return message if command is None else message.replace("its `gsae cache` command", f"`{command}`", 1)


# what each recipe entry is, where the entry's name is not an option's (the others are --<name>)
_RECIPE_WORDS = {"model_id": "--model", "model_revision": "the model's revision", "model_fingerprint": "the model's files",
                 "corpus_fingerprint": "the corpus (--dataset)", "prepend_bos": "BOS prepended (the tokenizer)",
                 "bos_stored": "BOS stored (--keep-bos)", "tokens_planned": "--tokens"}


def _check_recipe(path: str, attrs: dict[str, Any], wanted: dict[str, Any], corpus_spec: str | None = None) -> None:
    """Refuse a cache (its attributes ``attrs``) made with other settings, naming the first that differs and the
    command that made it (which resumes an incomplete one; a complete one is there to be used as it is);
    ``corpus_spec``: the --dataset asked for, named beside the cached one where the corpus (recorded as a
    fingerprint) differs."""
    stored = attrs.get("recipe", {})
    complete = bool(attrs.get("complete"))
    verb = "use" if complete else "resume"
    labels = {"corpus_fingerprint": ((attrs.get("corpus") or {}).get("spec"), corpus_spec)} if corpus_spec is not None else {}

    def show(value: Any, label: Any = None) -> str:
        text = "the default" if value is None else repr(value)
        return f"{label!r} {text}" if label is not None else text

    hub = str(stored.get("model_fingerprint", "")).startswith("hub:")
    for key in wanted:
        if stored.get(key) != wanted[key]:
            if key == "model_fingerprint" and hub and stored.get("model_revision") == wanted.get("model_revision"):
                continue  # a hub model's fingerprint names the revision asked for: main then, its commit now
            what = _RECIPE_WORDS.get(key, f"--{key.replace('_', '-')}")
            before, now = labels.get(key, (None, None))
            if key == "model_revision" and hub and stored.get(key):  # the hub's branch moved on since
                hint = f"pass --revision {stored[key]} (the commit it was cached from) to {verb} it"
            elif key in ("model_fingerprint", "model_revision") or (key == "corpus_fingerprint" and before == now):
                # the same names, other contents: no option gives back the cached ones
                hint = f"the cached rows came from other contents under the same names: restore them to {verb} it"
            else:
                command = cache_command(path, attrs)
                made_by = f"`{command}`" if command else "the original command"
                # a complete cache: its own command only says it is complete; "resume" would promise more
                hint = f"{made_by} made it: use it as it is" if complete else f"re-run {made_by} to resume it"
            raise GsaeError(f"{path} holds {'a complete' if complete else 'an incomplete'} cache made with other "
                            f"settings ({what}: {show(stored.get(key), before)} there, {show(wanted[key], now)} now); "
                            f"{hint}, or choose another --cache")


class _TokenCheck:
    """On resume, compares the regenerated tokens of already-committed rows with the stored ones,
    so a changed corpus or tokenizer is caught instead of mixing two caches.

    ``chunks`` (chunk -> committed rows) are the chunks to check: this rank's committed ones, so that
    every committed chunk is checked by the rank that owns it."""

    def __init__(self, store: ActivationStore, chunks: dict[int, int], block: int = 1 << 16):
        self.store = store
        self.chunks = chunks
        self.block = block
        self.start = 0  # first row of the pending run
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def feed(self, row: int, tokens: np.ndarray) -> None:
        """The regenerated tokens of rows ``[row, row + len(tokens))``; committed ones are compared."""
        step = self.store.chunk_tokens
        stop = row + len(tokens)
        for chunk in range(row // step, -(-stop // step)):
            if chunk not in self.chunks:
                continue
            first, last = max(row, chunk * step), min(stop, chunk * step + self.chunks[chunk])
            if first >= last:
                continue
            if self.pending_rows and self.start + self.pending_rows != first:
                self.flush()  # a gap: compare the run so far
            if not self.pending_rows:
                self.start = first
            self.pending.append(tokens[first - row : last - row])
            self.pending_rows += last - first
            if self.pending_rows >= self.block:
                self.flush()

    def flush(self) -> None:
        """Compare what was fed so far (before any new chunk is written, so a mismatch writes nothing)."""
        if not self.pending_rows:
            return
        regenerated = np.concatenate(self.pending)
        stored = self.store.tokens(self.start, self.start + len(regenerated))
        if not np.array_equal(regenerated, stored):
            row = self.start + int(np.argmax(regenerated != stored))
            raise GsaeError(
                f"{self.store.path} was made from other tokens (first difference at row {row:,}); the corpus "
                "or tokenizer changed since, so it cannot be resumed: choose another --cache"
            )
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


def _complete_as_asked(path: str, request: CacheRequest, spec: ModelSpec, corpus: Corpus,
                       device: torch.device) -> ActivationStore | None:
    """The store at ``path`` (opened to write) if it is complete and was made as ``request`` asks, told
    without loading the model (the embedded GGUF takes ~30 s to load on a CPU): only for models fingerprinted
    by their files, whose revision is the stored one; the entries that need the tokenizer follow from the
    stored ones (same files, same tokenizer).  A store made with other settings, complete or not, is refused
    here as the long way would refuse it after loading the model: with other files the model's fingerprint
    differs too.  None sends the command the long way (resuming, a hub model, and a cache made before
    2026-11-29 without BOS asked without --no-prepend-bos: whether its tokenizer has one was not stored)."""
    if spec.kind == "hub":  # its revision is resolved by loading it
        return None
    store = ActivationStore.open(path, mode="r+", allow_partial=True)
    recipe = store.attrs.get("recipe", {})
    if not recipe:
        return None
    bos = request.prepend_bos
    if bos is None:  # the tokenizer's default: BOS where it has one (the same files give the same tokenizer)
        tokenizer = store.attrs.get("tokenizer") or {}
        if recipe.get("prepend_bos") is True:
            bos = True
        elif "bos_token_id" in tokenizer:
            bos = tokenizer["bos_token_id"] is not None
        else:
            return None
    wanted = _recipe(request, spec, recipe.get("model_revision"), corpus, bos, not (bos and not request.keep_bos),
                     device)
    same = recipe == wanted
    if not same:
        _check_recipe(path, store.attrs, wanted, corpus.spec)
    return store if store.complete and same else None


def build_cache(request: CacheRequest, console: Any) -> CacheResult:
    """Stage one. Creates or resumes the store and fills it; returns what was done.

    Under torchrun every rank calls this: rank 0 creates or checks the store while the others wait,
    each rank fills its own chunks (:func:`fill_store`), and rank 0 finalizes.  Only rank 0 prints."""
    ranks = current_ranks()
    if not ranks.first:
        from rich.console import Console

        console = Console(quiet=True)  # progress and notes from rank 0 only
    _validate(request)
    spec = resolve_model_spec(request.model, request.revision)
    path = request.cache or default_cache_path(spec.slug)
    if ranks.world > 1:
        torch.set_num_threads(ranks.threads())  # ranks on one machine share its cores
    # the corpus and the device before the lock: a bad --dataset or --device left the lock's folder (gsae-cache/)
    corpus = open_corpus(request.dataset, text_field=request.text_field, split=request.split,
                         config=request.dataset_config)
    check_has_text(corpus)
    device = ranks.device(pick_device(request.device))
    with _cache_lock(path, ranks):
        return _build_cache(request, console, spec, path, ranks, corpus, device)


@contextlib.contextmanager
def _cache_lock(path: str, ranks: Ranks) -> Iterator[None]:
    """No second `gsae cache` on a local cache while one writes it (rank 0 holds the lock for a torchrun job,
    and every rank stops alike when it is taken): two started at once both made the store anew, and the one that
    failed first removed the other's files, leaving a damaged cache (the lock file:
    :func:`stores.activation_store.writer_lock_file`; none on object storage)."""
    lock = writer_lock_file(path) if ranks.first else None
    # the folders the lock file goes into, where this command makes them (gsae-cache/ on a first cache; also one
    # a process that let go removed as this one waited): removed again where the command leaves nothing in them
    # (refused, say, for a --context-length the model cannot take); a process that opened the lock file
    # meanwhile makes them anew (stores.locks._open)
    made = missing_folders(os.path.dirname(lock)) if lock is not None else []
    refused = None
    with contextlib.ExitStack() as held:
        held.callback(_remove_empty_folders, made)  # (after the lock file has gone)
        if lock is not None:
            # (a parent it cannot make: no lock, and _prepare_folder says why)
            busy = f"another gsae process is writing the cache {path} now; wait for it, or pass another --cache"
            try:
                # the lock file goes with the command: a refused one (a bad corpus, say) left it behind
                held.enter_context(exclusive(lock, GsaeError(busy), remove=True, made=made))
            except GsaeError:
                refused = busy
        if ranks.world > 1:
            refused = ranks.broadcast_from_first(refused)
        if refused:
            raise GsaeError(refused)
        yield


def _build_cache(request: CacheRequest, console: Any, spec: ModelSpec, path: str, ranks: Ranks, corpus: Corpus,
                 device: torch.device) -> CacheResult:
    state = probe(path) if ranks.first else "shared"
    created_folder = _prepare_folder(path) if state == "absent" else False
    store: ActivationStore | None = None
    try:
        if state == "store" and ranks.world == 1 and (store := _complete_as_asked(path, request, spec, corpus,
                                                                                   device)) is not None:
            store.remove_markers()  # (as below: a run killed inside finalize)
            fold_seconds_writing(store)
            return _complete_result(store)
        loading = time.perf_counter()
        with console.status(f"loading {spec.model_id} ..."):
            lm = load_model(spec, device)
        load_seconds = time.perf_counter() - loading
        limit = max_positions(lm.model)
        if limit is not None and request.context_length > limit:
            raise GsaeError(f"--context-length {request.context_length:,} is more than {spec.model_id} takes "
                            f"({limit:,} positions); pass --context-length {limit} or less")
        plan = window_plan(lm.tokenizer, request.context_length, request.prepend_bos)
        first_row = 1 if plan.bos_token_id is not None and not request.keep_bos else 0
        rows_per_window = request.context_length - first_row
        attributes, recipe = _attributes(request, lm, corpus, plan, rows_per_window, device)

        windows = iter_windows(corpus, lm.tokenizer, plan)
        first_window = next(windows, None)
        if first_window is None:
            raise _corpus_too_short_error(corpus, lm.tokenizer, plan)
        windows = itertools.chain([first_window], windows)

        complete = False
        if state == "store":
            store = ActivationStore.open(path, mode="r+", allow_partial=True)
            _check_recipe(path, store.attrs, recipe, corpus.spec)
            complete = store.complete
            if complete:  # a run killed inside finalize may have left its markers and timing parts
                store.remove_markers()
                fold_seconds_writing(store)
            else:
                store.remove_stale_temporaries()  # no rank writes yet: the others wait below
        elif state == "absent":
            # a chunk holds at most the cache: zarr writes a short chunk through a buffer of the whole chunk,
            # and --chunk-tokens 10^9 asked it for 60 GiB per layer (the default is ~4 MiB, fewer rows for a
            # small cache)
            chunk_tokens = (min(request.chunk_tokens, request.tokens) if request.chunk_tokens
                            else default_chunk_tokens(lm.d_model, request.dtype, request.tokens, rows_per_window))
            store = ActivationStore.create(
                path, n_layers=lm.n_layers, d_model=lm.d_model, n_tokens=request.tokens,
                chunk_tokens=chunk_tokens, dtype=request.dtype, compression=request.compression,
                keep_bits=request.keep_bits, attributes=attributes,
            )
        # the other ranks wait here until rank 0 has created or checked the store (one rank creating:
        # several creating with mode="w" crash or deadlock), then open it r+
        complete = ranks.broadcast_from_first(complete)
        if not ranks.first:
            store = ActivationStore.open(path, mode="r+", allow_partial=True)
        if complete:
            if not ranks.first:
                return _rank_result(store, ranks)
            return _complete_result(store)
        if ranks.world > 1:
            store.use_markers()
        # full float32 whatever the process set before (a training run's TF32): the bytes must not depend on it
        with matmul_precision(device, tf32=False):
            result = fill_store(store, lm, _read_corpus(windows), batch_size=request.batch_size, first_row=first_row,
                                rows_per_window=rows_per_window, console=console, write_threads=request.write_threads,
                                ranks=ranks, writer_kind=request.writer)
        result.load_seconds = load_seconds
        return result
    except BaseException as exc:
        # a store this run made and committed nothing to (the corpus failed at its first batches, say) goes:
        # left, it held the path against any other arguments, with nothing in it to resume
        if state == "absent" and ranks.world == 1 and store is not None and not store.committed_chunks():
            _remove_store(path)
            store = None
        if isinstance(exc, CorpusFailed) and store is not None and ranks.world == 1:
            kept = sum(stop - start for start, stop in map(store.chunk_rows, store.committed_chunks()))
            # its command would fail at the same place, and a corrected corpus has another fingerprint
            raise GsaeError(f"{exc}; {path} keeps the {kept:,} tokens cached before it, which only this corpus, "
                            "unchanged, can finish: remove that folder (or pass another --cache) to cache the "
                            "corrected corpus") from None
        raise
    finally:
        if store is None and created_folder:
            _remove_if_empty(path)


class CorpusFailed(GsaeError):
    """The corpus could not be read further while the cache was being filled (a bad record)."""


def _read_corpus(windows: Iterator[list[int]]) -> Iterator[list[int]]:
    """``windows``, with a GsaeError raised while reading them marked as the corpus's (:class:`CorpusFailed`)."""
    try:
        yield from windows
    except CorpusFailed:
        raise
    except GsaeError as exc:
        raise CorpusFailed(str(exc)) from None


def _check_token_ids(ids: np.ndarray, n_embeddings: int | None, lm: LoadedModel) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that is not the model's): torch's
    embedding lookup raised "IndexError: index out of range in self" on the CPU, and a device assert on CUDA."""
    if n_embeddings is not None and ids.size and (largest := int(ids.max())) >= n_embeddings:
        raise GsaeError(f"the tokenizer of {lm.spec.model_id!r} gives token id {largest:,} for this corpus, beyond the "
                        f"model's {n_embeddings:,} input embeddings: the tokenizer is not this model's (save the "
                        "model's own with save_pretrained beside it)")


def _remove_store(path: str) -> None:
    """Remove the store at ``path`` (made by this run, in a folder that was empty or absent)."""
    fs, root = fsspec.core.url_to_fs(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)


def _remove_if_empty(path: str) -> None:
    try:
        Path(path).rmdir()
    except OSError:
        pass


def _remove_empty_folders(folders: list[str]) -> None:
    """Remove those of ``folders`` that are empty, deepest first (a parent once its child has gone)."""
    for folder in sorted(set(folders), key=lambda f: f.count(os.sep), reverse=True):
        _remove_if_empty(folder)


class _Pending:
    """This rank's chunks that are not committed yet: its range less the committed ones, never listed
    (`--tokens 9999999999999` planned 2.7 billion chunks, and their list filled the memory)."""

    def __init__(self, mine: range, committed: Container[int]):
        self.mine, self.committed = mine, committed

    def __contains__(self, chunk: object) -> bool:
        return chunk in self.mine and chunk not in self.committed

    def first_from(self, chunk: int) -> int | None:
        """The first pending chunk from ``chunk`` on, or None."""
        chunk = max(chunk, self.mine.start)
        while chunk < self.mine.stop and chunk in self.committed:
            chunk += 1
        return chunk if chunk < self.mine.stop else None


def rank_chunks(n_chunks: int, ranks: Ranks) -> range:
    """The chunks a rank writes: a contiguous range, the ranks in order, sizes differing by at most one.

    Contiguous, because a forward batch that straddles two ranks' chunks is run by both (each keeps its
    own rows): one such batch per boundary, where chunks dealt round-robin would cost one per chunk
    whenever a chunk is smaller than a batch (the default 4 MiB chunk of SmolLM2 is 3,640 rows, a batch
    of 16 windows of 256 is 4,080)."""
    return range(ranks.rank * n_chunks // ranks.world, (ranks.rank + 1) * n_chunks // ranks.world)


def fill_store(store: ActivationStore, lm: LoadedModel, windows: Iterator[list[int]], *, batch_size: int,
               first_row: int, rows_per_window: int, console: Any, write_threads: int | None = None,
               ranks: Ranks = Ranks(), writer_kind: str = "auto", worker_nice_by: int | None = None,
               buffers_ahead: bool = True) -> CacheResult:
    """Run ``windows`` through the model in batches and write this rank's uncommitted chunks until the
    store holds its planned tokens or the windows run out, then (rank 0) finalize.

    Every run and every rank cuts the windows into the same batches as an uninterrupted single process
    (batch ``b`` is windows ``[b·batch_size, (b+1)·batch_size)``, the last only those up to the planned
    tokens): the forward pass sees identical inputs and produces identical bytes.  A batch holding none of
    this rank's uncommitted rows is not run, its tokens only compared with the stored ones where they are
    committed.  ``worker_nice_by``: how much the
    writer's threads or processes lower their priority (default: pipeline.processes.worker_nice).
    ``buffers_ahead``: the pinned chunk buffers are made on a thread of their own as the first batches run
    (:meth:`ChunkBuffers.make_ahead`), not in the hooks."""
    world = ranks.world > 1
    if not world:
        fold_seconds_writing(store)  # one writer after several: their parts into timing.json first
    committed = store.committed_chunks()
    resumed_from = sum(committed.values())
    mine = rank_chunks(store.n_chunks_planned, ranks)
    todo = _Pending(mine, committed)
    check = _TokenCheck(store, {chunk: rows for chunk, rows in committed.items() if chunk in mine})
    first_mine = store.chunk_rows(mine.start)[0] if mine else 0
    end_row = store.chunk_rows(mine.stop - 1)[1] if mine else 0  # windows are needed up to here

    np_dtype = np.dtype(STORAGE_DTYPES[store.dtype][0])
    part = ranks.rank if world else None
    seconds_before = read_seconds_writing(store, part) or 0.0
    threads = write_threads or ranks.threads()
    # a batch's chunks in flight where the host waits while the model runs (a GPU); on a CPU the forward
    # keeps the cores busy itself, and more chunks in flight would only hold more memory
    batch_rows = batch_size * rows_per_window if lm.device.type == "cuda" else 0
    # the chunk buffers: those in flight, and those two batches fill (on a GPU the next batch runs while the
    # last one's chunks go to the writer; whole ones and one begun on each side)
    buffers_bytes = (ChunkWriter.in_flight(store, threads, batch_rows)
                     + 2 * -(-batch_size * rows_per_window // store.chunk_tokens) + 1) * chunk_bytes(store)
    # ranks on one machine share its /dev/shm; the writer stops the processes, the assembler their memory
    nice = worker_nice(lm.device, "writer") if worker_nice_by is None else worker_nice_by
    n_embeddings = getattr(lm.model.get_input_embeddings(), "num_embeddings", None)
    encoder = start_processes(writer_kind, "writer", store, lm.device, buffers_bytes * ranks.local_world, threads, nice)
    assembler = ChunkAssembler(store, np_dtype, todo, pinned=lm.device.type == "cuda",
                                shared=encoder.shared if encoder is not None else None)
    writer = ChunkWriter(store, threads, seconds_before, part, batch_rows=batch_rows, encoder=encoder, nice=nice)
    capture = ForwardCapture(lm, first_row, store.dtype)
    row = 0  # first row of the next batch
    rows_this_run = 0
    next_todo = todo.first_from(mine.start)  # the first pending chunk not wholly before ``row``
    exhausted = False
    started = time.perf_counter()

    progress = make_progress(console)
    # where the seconds go (CacheResult.phases): reading and tokenizing windows, the forward pass with its
    # hooks and device copies, making the chunk buffers (in the hooks: taken out of the forward's time) and
    # letting them go, waiting for the writer (back-pressure, commits); the rest is bookkeeping
    phases = dict.fromkeys(("windows", "forward", "buffers", "writer_wait"), 0.0)
    timeline: list[tuple[float, int]] = []
    clock = time.perf_counter
    launched = None  # on a GPU, the batch whose forward runs while the host hands the one before to the writer

    def finish(batch: tuple[int, np.ndarray, Any]) -> None:
        """Wait for a batch's forward and copies, then hand the chunks it completes to the writer."""
        nonlocal rows_this_run
        first, batch_tokens, ran = batch
        mark = clock()
        if ran is not None:
            ran.synchronize()
        phases["forward"] += clock() - mark
        for item in assembler.add(first, batch_tokens):
            mark = clock()
            writer.submit(item)
            phases["writer_wait"] += clock() - mark
            rows_this_run += len(item.tokens)
        timeline.append((clock() - started, (timeline[-1][1] if timeline else 0) + len(batch_tokens)))

    try:
        if buffers_ahead:  # the chunk buffers the batches fill and the writer holds, at most the chunks left to write
            left = len(mine) - sum(1 for chunk in committed if chunk in mine)
            assembler.buffers.make_ahead(min(buffers_bytes // chunk_bytes(store), left))
        with progress:
            done = sum(rows for chunk, rows in committed.items() if chunk in mine)
            task = progress.add_task("caching", total=end_row - first_mine, completed=done, resumed_at=done)
            while row < end_row:
                # the cache's last batch runs only the windows its rows need (--tokens 1000 ran 16 windows of
                # 255 rows, 4× the work); only that one, so every rank and every resumed run cuts the same batches
                wanted = min(batch_size, -(-(store.tokens_planned - row) // rows_per_window))
                mark = clock()
                group = list(itertools.islice(windows, wanted))
                phases["windows"] += clock() - mark
                if not group:
                    exhausted = True
                    break
                stop = min(row + len(group) * rows_per_window, store.tokens_planned)
                while next_todo is not None and store.chunk_rows(next_todo)[1] <= row:
                    next_todo = todo.first_from(next_todo + 1)
                # one pass over the batch's Python ints (torch.tensor on the lists took 3.5× as long here)
                ids = np.asarray(group, dtype=np.int64)
                _check_token_ids(ids, n_embeddings, lm)
                tokens = ids[:, first_row:].reshape(-1)[: stop - row].astype(np.int32)
                if next_todo is not None and store.chunk_rows(next_todo)[0] < stop:
                    mark = clock()
                    ran = capture.run(_to_device(ids, lm.device), functools.partial(assembler.take, row, stop))
                    phases["forward"] += clock() - mark
                    check.feed(row, tokens)
                    check.flush()  # before any new chunk of this batch is written
                    # on a GPU this batch runs while the one before goes to the writer (its host work used to
                    # leave the GPU idle: 1.4 of 3.2 s on the H200); on a CPU it is done already
                    if launched is not None:
                        finish(launched)
                    launched = None
                    if ran is None:
                        finish((row, tokens, None))
                    else:
                        launched = (row, tokens, ran)
                else:  # none of this rank's rows to write: only check the committed ones
                    check.feed(row, tokens)
                # a resumed run re-reads the committed batches first: the bar stays at what was written
                # (going back to 0 and up again gave rich's rate a burst of millions of tok/s)
                progress.update(task, completed=max(done, min(stop, end_row) - first_mine))
                row = stop
                if len(group) < wanted:
                    exhausted = row < end_row
                    break
            if exhausted:  # the bar ends full, its ETA at 0, not stopped short with the last ETA shown
                progress.update(task, total=max(done, min(row, end_row) - first_mine))
            check.flush()
            if launched is not None:
                finish(launched)
                launched = None
            mark = clock()
            if exhausted and (last := assembler.flush()) is not None:
                writer.submit(last)
                rows_this_run += len(last.tokens)
            writer.drain()
            phases["writer_wait"] += clock() - mark
    finally:
        capture.close()
        if lm.device.type == "cuda":  # after an error, a batch's copies land before the buffers are unpinned
            torch.cuda.current_stream(lm.device).synchronize()
        try:
            writer.close()
        finally:  # also when Ctrl-C lands in the writer's close: no chunk buffer stays pinned or named
            assembler.close()
    if world and not ranks.first:  # this rank's seconds, then rank 0 finalizes once every rank is here
        write_seconds_writing(store, seconds_before + time.perf_counter() - started, part)
    outcomes = ranks.gather_to_first({ranks.rank: (exhausted, rows_this_run)})
    if not ranks.first:
        return _rank_result(store, ranks)
    if world:
        store.refresh_commits()  # the other ranks' markers
    if store.tokens_written == 0:
        raise GsaeError("the corpus gave no rows to write")
    store.finalize(exhausted=any(ran_out for ran_out, _ in outcomes.values()))
    elapsed = time.perf_counter() - started
    write_seconds_writing(store, seconds_before + elapsed, part)
    fold_seconds_writing(store)
    result = _result(store, elapsed, sum(rows for _, rows in outcomes.values()), resumed_from,
                     corpus_exhausted=store.tokens_written < store.tokens_planned)
    if result.corpus_exhausted:
        result.chunking_note = chunking_note(store)
    # made in the hooks (inside the forward's seconds), let go after the loop (inside none)
    phases["forward"] -= assembler.buffers.seconds_making
    phases["buffers"] = assembler.buffers.seconds_making + assembler.buffers.seconds_closing
    result.phases = {name: round(seconds, 3) for name, seconds in phases.items()}
    result.timeline = timeline
    result.writer = writer.description
    return result


def chunking_note(store: ActivationStore) -> str:
    """For a cache whose corpus ran out: see :func:`chunking_advice`."""
    return chunking_advice(store.tokens_written, store.tokens_planned, store.chunk_tokens, store.d_model, store.dtype,
                           int(store.attrs.get("rows_per_window") or 0),
                           store.attrs.get("recipe", {}).get("chunk_tokens") is not None)


def _held_out_rows(tokens: int, chunk_tokens: int) -> int:
    """Rows of the chunks training holds out (the last ones, the short last one among them)."""
    n = -(-tokens // chunk_tokens)
    return tokens - (n - held_out_chunks(n)) * chunk_tokens


def chunking_advice(tokens: int, planned: int, chunk_tokens: int, d_model: int, dtype: str, rows_per_window: int,
                    chunk_tokens_given: bool) -> str:
    """What the chunks of a cache whose corpus ran out at ``tokens`` of ``planned`` mean for training, where that
    is a problem: too few to train on (training holds the last ~5% out, at least one chunk), a held-out slice
    too short to evaluate (100 rows and a whole window), or holding out far more than 5%.  The chunks were sized
    before the corpus was read, from ``planned`` (or by ``--chunk-tokens``): the advice names the ``--tokens``
    that sizes them for what the corpus held, where that cuts it into more chunks, or says the corpus is too
    small.  "" where there is no problem, or nothing better to suggest."""
    from pipeline.evaluate import MIN_TOKENS, whole_windows

    n = -(-tokens // chunk_tokens)

    def problem(size: int) -> tuple[str, bool]:
        """What is wrong with chunks of ``size`` rows, and whether it keeps the cache from training or evaluation."""
        if -(-tokens // size) < 2:
            return "too few for `gsae train`, which holds one out and trains on the others", True
        held = _held_out_rows(tokens, size)
        windows = whole_windows(tokens, tokens - held, rows_per_window) if rows_per_window else 1
        if held < MIN_TOKENS or windows < 1:  # as pipeline.evaluate.check_held_out
            return (f"`gsae train` would hold out its last {held:,} rows, too few to evaluate ({MIN_TOKENS} rows "
                    f"and a whole window of {rows_per_window:,} are needed)"), True
        if held / tokens > 2 * HELD_OUT_FRACTION:
            return (f"`gsae train` holds out {held / tokens:.0%} of the rows (~{HELD_OUT_FRACTION:.0%} where there are "
                    "20 chunks or more)"), False
        return "", False

    now, hard = problem(chunk_tokens)
    if not now:
        return ""
    sized = "--chunk-tokens" if chunk_tokens_given else f"{planned:,} tokens"
    shape = f"{n} chunk{'s' if n > 1 else ''} (of {chunk_tokens:,} rows, sized for {sized})"
    if chunk_tokens_given:  # the size is the user's: said only where it cannot be trained on or evaluated
        return f"{shape}: {now}; cache it again with a smaller --chunk-tokens, or more text" if hard else ""
    finer = default_chunk_tokens(d_model, dtype, tokens, rows_per_window)  # what --tokens set to what it held gives
    more = -(-tokens // finer)
    if finer < chunk_tokens and not problem(finer)[1] and (hard or more > n):
        return (f"{shape}: {now}; to cut it into {more} equal chunks, cache it again with --tokens {tokens} "
                "(into a new --cache, or remove this one)")
    return f"{shape}: {now}; the corpus is too small for a cache gsae can train on: give it more text" if hard else ""


def _rank_result(store: ActivationStore, ranks: Ranks) -> CacheResult:
    """What a rank other than 0 returns: rank 0 reports for all (nothing here is printed)."""
    return CacheResult(path=store.path, tokens_written=0, tokens_planned=store.tokens_planned,
                       n_layers=store.n_layers, d_model=store.d_model, bytes_on_disk=0, raw_bytes=0, elapsed=0.0,
                       tokens_this_run=0, resumed_from=0, rank=ranks.rank)


def _complete_result(store: ActivationStore) -> CacheResult:
    """A cache found complete: nothing ran now; its summary shows what making it took (``seconds_made``).  One
    whose chunk files are gone is refused (it said "already complete", and training failed on the chunk)."""
    store.check_chunks_present()
    result = _result(store, 0.0, 0, store.tokens_written, already_complete=True)
    result.seconds_made = read_seconds_writing(store)
    return result


def _result(store: ActivationStore, elapsed: float, tokens_this_run: int, resumed_from: int,
            **flags: bool) -> CacheResult:
    on_disk, activations = store.disk_bytes()
    return CacheResult(
        path=store.path, tokens_written=store.tokens_written, tokens_planned=store.tokens_planned,
        n_layers=store.n_layers, d_model=store.d_model, bytes_on_disk=on_disk,
        activation_bytes=activations, raw_bytes=store.raw_activation_bytes(), elapsed=elapsed,
        tokens_this_run=tokens_this_run,
        resumed_from=resumed_from, overflow_values=list(store.attrs.get("overflow_values", [])), **flags,
    )
