"""Stage two (b): train one SAE per layer group (or per layer: the baseline) from the store's stream."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from pipeline import __version__
from pipeline.errors import GsaeError, check_seed
from pipeline.evaluate import check_held_out, layer_reconstruction, threshold_note
from pipeline.group import grouping_record, mark_used, result_name
from pipeline.grouping import Grouping, default_layers, layer_span, partition_text
from pipeline.models import matmul_precision, pick_device
from pipeline.processes import check_cache as check_processes_cache, start_processes, stop_processes
from pipeline.processes import worker_nice, worker_threads
from pipeline.progress import CountColumn, LoggedProgress, RateColumn, RemainingColumn
from pipeline.ranks import Ranks, assign as assign_ranks, current as current_ranks
from pipeline.requests import (ARCHITECTURES, EVAL_WINDOWS, L1_COEFFICIENT, PRECISIONS, RUNS_ROOT, TOP_K_ARCHITECTURES,
                               WORKER_KINDS, TrainRequest)
from pipeline.run import (SUMMARY, Run, RunConfig, cache_around, cache_fingerprint, check_new_run_folder, checkpoint_step,
                          fingerprint_changes, join, pack_training_state)
from pipeline.sae import THRESHOLD_KEPT, THRESHOLD_RATE, SparseAutoencoder, default_k, default_lr
from stores import STORAGE_DTYPES, ActivationStore
from stores.chunk_files import ChunkProcesses
from stores.held_out import split_chunks
from stores.stream import TrainingStream

_SUMMARY_EVAL_ROWS = 16384  # held-out rows per layer for the summary's FVU
# a checkpoint at least this often, whatever --checkpoint-every says: 200 steps of 29 SAEs take hours on a CPU
CHECKPOINT_SECONDS = 900.0


@dataclass
class TrainResult:
    run: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # on rank 0 (every row there)
    seconds: float = 0.0
    resumed_from: int = 0
    rank: int = 0
    trained_already: bool = False  # nothing trained: the run was finished before this call
    # the SAEs each process trained, taking turns on it (one list: one process; under torchrun one per rank)
    turns: list[list[int]] = field(default_factory=list)


def validate_request(request: TrainRequest, device: bool = True) -> None:
    """Refuse, before anything is made, a request whose options cannot train (one line each); ``device``:
    also one whose --device is not here."""
    if request.architecture not in ARCHITECTURES:
        raise GsaeError(f"--architecture must be one of {', '.join(ARCHITECTURES)}")
    if request.reader not in WORKER_KINDS:
        raise GsaeError(f"--reader must be one of {', '.join(WORKER_KINDS)}")
    if not (math.isfinite(request.expansion) and request.expansion > 0):
        raise GsaeError(f"--expansion must be a positive finite number (got {request.expansion})")
    if request.tokens <= 0:
        raise GsaeError(f"--tokens must be positive (got {request.tokens})")
    if request.batch_size < 2:  # the FVU of a step divides by its batch's variance: none in one row
        raise GsaeError(f"--batch-size must be at least 2 (got {request.batch_size})")
    if request.dead_tokens is not None and request.dead_tokens <= 0:
        raise GsaeError(f"--dead-tokens must be positive (got {request.dead_tokens})")
    if not (math.isfinite(request.l1_coefficient) and request.l1_coefficient >= 0):
        raise GsaeError(f"--l1-coefficient must be a finite number ≥ 0 (got {request.l1_coefficient})")
    if request.lr is not None and not (math.isfinite(request.lr) and request.lr > 0):
        raise GsaeError(f"--lr must be a positive finite number (got {request.lr})")
    check_seed(request.seed)
    if request.checkpoint_every <= 0:
        raise GsaeError(f"--checkpoint-every must be positive (got {request.checkpoint_every})")
    if request.precision not in PRECISIONS:
        raise GsaeError(f"--precision must be one of {', '.join(PRECISIONS)} (got {request.precision})")
    if request.groups is not None and request.baseline:
        raise GsaeError("give either --groups N or --baseline, not both")
    if device:
        pick_device(request.device)  # before the run folder is made: a run that cannot start leaves nothing


def _partition(request: TrainRequest, store: ActivationStore) -> tuple[list[list[int]], str, dict[str, Any] | None]:
    """(groups, label, snapshot of the grouping they come from): the baseline's one layer per SAE, or the
    N-group partition of the grouping saved next to the cache (`gsae group` makes it)."""
    record = grouping_record(store, request.metric)  # a damaged one is named in one line
    if request.baseline:
        # the layers of the --metric grouping, so that the baseline covers what the group runs cover (a
        # `gsae group --layers` subset); without one, those grouping takes by default, without its two-layer
        # minimum (a model of one or two blocks: one SAE)
        layers = Grouping.from_json(record).layers if record is not None else default_layers(store.n_layers) or [0]
        return [[layer] for layer in layers], "baseline", None
    if record is None:
        raise GsaeError(f"no {request.metric} grouping next to {store.path}: run `gsae group --metric "
                        f"{request.metric} --cache {store.path}` first (or train --baseline)")
    grouping = Grouping.from_json(record)
    n = request.groups if request.groups is not None else grouping.chosen
    if not 1 <= n <= len(grouping.layers):
        raise GsaeError(f"--groups must be between 1 and {len(grouping.layers)} (the grouped layers); got {n}")
    point = grouping.point(n)
    # the run keeps what it was trained on: a later `gsae group --force` does not change its report
    snapshot = {"file": f"{store.path}/{result_name(request.metric)}", "n_groups": n, "amad": point["amad"],
                "seconds": record.get("seconds"), "arguments": record.get("arguments")}
    return point["groups"], f"{request.metric}-g{n}", snapshot


def _check_fits(n_saes: int, n_latents: int, d: int, request: TrainRequest, windows_bytes: int = 0) -> None:
    """Refuse, before the run is made, SAEs that cannot fit this process's device: weights and Adam's two
    moments (6 n·d floats per SAE, all of this process's SAEs at once), one batch's latents (3 batch·n) and
    ``windows_bytes``, the windows of their streams (on a GPU their device copies, on the CPU the windows); on
    a GPU, also the host windows (pinned: the ranks on this machine's together) that fit its memory."""
    ranks = current_ranks()
    here = math.ceil(n_saes / ranks.world)
    need = 4 * (here * 6 * n_latents * d + 3 * request.batch_size * n_latents) + windows_bytes
    device = pick_device(request.device)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    have = torch.cuda.get_device_properties(device.index or 0).total_memory if device.type == "cuda" else host
    if device.type == "cuda" and windows_bytes * ranks.local_world > host:
        raise GsaeError(f"the training windows of {here} SAE{'s' if here > 1 else ''} per rank need "
                        f"{windows_bytes * ranks.local_world / 2**30:,.1f} GiB of pinned host memory, more than the "
                        f"{host / 2**30:,.1f} GiB of this machine; spread the SAEs over more machines (torchrun), or "
                        "make the cache's chunks smaller (gsae cache --chunk-tokens)")
    if need > have:
        raise GsaeError(f"{here} SAE{'s' if here > 1 else ''} of {n_latents:,} latents × d_model {d}, with their "
                        f"training windows ({windows_bytes / 2**30:,.1f} GiB), need about "
                        f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of the {device.type}; "
                        "lower --expansion or --batch-size (or spread the SAEs over ranks with torchrun)"
                        + ("; the windows grow with the layers per SAE and the cache's chunk size (gsae cache "
                           "--chunk-tokens)" if 2 * windows_bytes > need else ""))


def check_sae_shape(d: int, expansion: float, k: int | None, uses_k: bool = True) -> tuple[int, int]:
    """(latents, k) of an SAE of ``expansion`` × ``d`` latents keeping ``k`` (None: the default for ``d``);
    one line where that cannot be.  ``uses_k`` False (ReLU, JumpReLU: no top-k): ``k`` is not checked and
    the config keeps the default, within the latents."""
    n_latents = max(1, int(round(d * expansion)))
    if n_latents < 2:
        raise GsaeError(f"--expansion {expansion:g} gives {n_latents} latent for d_model {d}; "
                        "an SAE needs at least 2 (a larger --expansion)")
    if not uses_k:
        return n_latents, min(default_k(d), n_latents - 1)
    if k is None and not default_k(d) < n_latents:
        raise GsaeError(f"--expansion {expansion:g} gives d_sae = {n_latents} latents, no more than the "
                        f"k = {default_k(d)} that TopK keeps by default at d_model {d} (about d_model / 6); pass a "
                        "larger --expansion (or, to `gsae train`, a smaller --k)")
    k = k if k is not None else default_k(d)
    if not 0 < k < n_latents:
        raise GsaeError(f"--k must be between 1 and {n_latents - 1} (d_sae = {n_latents}); got {k}")
    return n_latents, k


def _plan(request: TrainRequest, store: ActivationStore) -> RunConfig:
    """The run's configuration: groups, scales, SAE shape, learning rate, held-out slice (whether it fits
    this machine is :func:`_check_trainable`'s)."""
    d = store.d_model
    n_latents, k = check_sae_shape(d, request.expansion, request.k, uses_k=request.architecture in TOP_K_ARCHITECTURES)
    groups, label, grouping = _partition(request, store)
    try:
        train_chunks, eval_chunks = split_chunks(store, request.eval_fraction)
    except ValueError as exc:
        raise GsaeError(str(exc)) from None
    # the training chunks' statistics (the held-out rows stay unseen); damaged ones are named before the
    # run is made
    norms = store.leading_stats(len(train_chunks))[1]
    attrs = store.attrs
    dead_tokens = request.dead_tokens if request.dead_tokens is not None else default_dead_tokens(request)
    return RunConfig(
        # an absolute path for a local cache, so that eval, report and --resume find it from any folder
        label=label, cache=_where(store.path),
        cache_fingerprint=cache_fingerprint(store),
        source={"model_id": attrs.get("model_id"), "context_length": attrs.get("context_length"),
                "prepend_bos": attrs.get("prepend_bos"), "corpus": attrs.get("corpus", {}).get("spec"),
                "blocks_path": attrs.get("blocks_path"), "model_source": attrs.get("model_source"),
                "model_revision": attrs.get("model_revision")},
        groups=groups, scales={layer: float(1.0 / norms[layer]) for group in groups for layer in group},
        metric=None if request.baseline else request.metric, grouping=grouping,
        d_in=d, n_latents=n_latents, k=k, architecture=request.architecture,
        lr=request.lr or default_lr(n_latents), steps=-(-request.tokens // request.batch_size),
        batch_size=request.batch_size, dead_tokens=dead_tokens, seed=request.seed,
        window_chunks=request.window_chunks, checkpoint_every=request.checkpoint_every, log_every=request.log_every,
        device=request.device, tf32=request.tf32, precision=request.precision, l1_coefficient=request.l1_coefficient,
        train_chunks=train_chunks, eval_chunks=eval_chunks,
        eval_rows=[store.chunk_rows(eval_chunks[0])[0], store.n_tokens],
        arguments=_arguments(request), gsae_version=__version__)


def default_dead_tokens(request: TrainRequest) -> int:
    """min(10M, tokens / 10), and at least one batch."""
    return min(10_000_000, max(request.batch_size, request.tokens // 10))


# the cache is identified by its fingerprint instead; who decodes the chunks changes no result
_NOT_IDENTIFYING = ("resume", "out", "cache", "given", "reader")


def _arguments(request: TrainRequest) -> dict[str, Any]:
    """The request as it identifies a run: everything but --resume, where the run goes and the cache path."""
    return {k: v for k, v in asdict(request).items() if k not in _NOT_IDENTIFYING}


def argument_changes(run: RunConfig, request: TrainRequest, only: tuple[str, ...] | None = None) -> list[str]:
    """How ``request`` differs from the arguments ``run`` was made with ("--tokens 300000 → 1000000",
    "--k default → 5", "--baseline off → on"), among ``only`` when given; arguments an older run did not
    record count as their defaults."""
    defaults = _arguments(TrainRequest(cache=""))
    old = {**defaults, **{k: v for k, v in run.arguments.items() if k not in _NOT_IDENTIFYING}}
    new = _arguments(request)
    return [f"--{key.replace('_', '-')} {_shown(old.get(key))} → {_shown(new[key])}" for key in new
            if old.get(key) != new[key] and (only is None or key in only)]


def _shown(value: Any) -> str:
    """An argument's value as a user typed it: a flag on or off, "default" for an option left out."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "default" if value is None else str(value)


def _store_of(config: RunConfig, cache: str, run: str) -> ActivationStore:
    store = ActivationStore.open(cache)
    differ = fingerprint_changes(config.cache_fingerprint, cache_fingerprint(store))
    if differ:
        raise GsaeError(f"the cache {cache} differs from the one run {run} was trained on (there vs here: "
                        f"{'; '.join(differ)}); resume with that cache")
    return store


def _open_run(request: TrainRequest, console: Any, scope: contextlib.ExitStack) -> tuple[Run, ActivationStore]:
    """The run to train: a new one, or an unfinished one continued (from its last checkpoint, or from
    the start when it was killed before its first) by ``--resume`` or by the same command again.  Its
    lock is entered into ``scope`` before anything of an existing run is read to be used or replaced."""
    if request.resume:
        if not request.out:
            raise GsaeError("--resume needs --out DIR, the run to continue")
        config = Run.read_config(request.out)
        if config is None:
            raise GsaeError(f"nothing to resume at {request.out}: no config.json there")
        run = Run(request.out, config)
        typed = argument_changes(config, request, only=request.given)
        if typed:  # continued as it was made: an option typed otherwise would be ignored
            raise GsaeError(f"--resume continues {request.out} with the arguments it was made with, not "
                            f"{'; '.join(typed)}; leave those options out, or pass --out for a new run")
        scope.enter_context(run.training_lock())
        run = Run(request.out, Run.read_config(request.out))  # as it is now that none may change it
        if run.state in ("trained", "evaluated"):
            raise _trained_already(run)
        store = _store_of(config, request.cache or config.cache, request.out)  # without --cache, the run's
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            console.print(f"[yellow]note[/]: {request.out} has no checkpoint yet (it was stopped before its first): "
                          "training starts from step 0")
        else:
            console.print(f"continuing {request.out} from its checkpoint at step {checkpoint_step(checkpoint):,}")
        return run, store
    at_out = Run.read_config(request.out) if request.out else None
    if at_out is None or Run(request.out, at_out).state not in ("trained", "evaluated"):
        pick_device(request.device)  # first (a finished run is found so without its device: _check_trainable)
    config, store = plan(request)
    path = request.out or join(RUNS_ROOT, f"{store.path.rstrip('/').rsplit('/', 1)[-1]}-{config.label}")
    inside = cache_around(path)  # before any note: nothing of a run goes into a cache
    if inside is not None:
        where = "is a gsae cache" if inside == str(path) else f"is inside the gsae cache {inside}"
        raise GsaeError(f"{path} {where}; pass --out a folder of its own for the run")
    existing = Run.read_config(path)
    locked = existing is not None
    if not locked:
        check_new_run_folder(path)
    if existing is not None:
        scope.enter_context(Run(path, existing).training_lock())  # from here: no other process trains or replaces it
        existing = Run.read_config(path)  # as it is now that none may change it
        run = Run(path, existing)
        changes = check_existing(run, request, config)
        if run.state in ("trained", "evaluated"):
            raise _trained_already(run)
        checkpoint = run.latest_checkpoint()
        if changes:  # stopped before its first checkpoint: nothing trained to lose
            console.print(f"[yellow]note[/]: replacing the unfinished run in {path} ({'; '.join(changes)}): "
                          "it was stopped before its first checkpoint")
            existing = None
    _check_trainable(config, request, store)
    if existing is not None:
        where = (f"from its checkpoint at step {checkpoint_step(checkpoint):,}" if checkpoint else
                 "from step 0: it was stopped before its first checkpoint")
        console.print(f"continuing the unfinished run in {path} (same arguments) {where}")
        if existing.grouping:  # again: a kill may have come between creating the run and marking
            mark_used(store, request.metric, _where(path))
        return run, _store_of(existing, request.cache, path)
    if config.grouping:  # marked first: a kill after creating the run leaves no run unmarked
        mark_used(store, request.metric, _where(path))
    for note in _plan_notes(request, config, store):
        console.print(f"[yellow]note[/]: {note}")
    run = Run.create(path, config)
    if not locked:  # a new run (a replaced one's lock is held already)
        scope.enter_context(run.training_lock())
    return run, store


def run_changes(existing: RunConfig, request: TrainRequest, planned: RunConfig) -> list[str]:
    """How the run ``request`` plans (``planned``) differs from ``existing``, the run already in its folder:
    its arguments, its cache (by fingerprint: two caches may share the folder name runs are named by), its
    layer groups (the grouping replaced since, or the baseline's layers)."""
    changes = argument_changes(existing, request)
    cache = fingerprint_changes(existing.cache_fingerprint, planned.cache_fingerprint)
    if cache:
        changes.append(f"another cache ({existing.cache} there; {'; '.join(cache)})")
    if existing.groups != planned.groups:
        changes.append(f"layer groups {partition_text(existing.groups, ' ')} → {partition_text(planned.groups, ' ')}")
    return changes


def check_existing(run: Run, request: TrainRequest, planned: RunConfig) -> list[str]:
    """What the same command may do with the run already in its --out.  A finished run, or one with a
    checkpoint, made otherwise (:func:`run_changes`) stops it, in one line naming the changes; a run stopped
    before its first checkpoint made otherwise is replaced (its changes are returned); [] where the run is
    the one asked for (continued, or trained already)."""
    changes = run_changes(run.config, request, planned)
    if changes and run.state in ("trained", "evaluated"):
        raise GsaeError(f"{run.path} already holds a finished run, made otherwise ({'; '.join(changes)}); pass --out "
                        "for a new one")
    if changes and run.latest_checkpoint() is not None:
        raise GsaeError(f"{run.path} holds an unfinished run made otherwise ({'; '.join(changes)}); continue it with "
                        f"`gsae train --out {run.path} --resume`, or pass --out for a new one")
    return changes


def plan(request: TrainRequest) -> tuple[RunConfig, ActivationStore]:
    """The run ``request`` would make, and its cache (refusing what :func:`validate_request` refuses, but
    not a device this machine lacks, nor SAEs too large for it: a run trained elsewhere is still found to
    be trained already here)."""
    validate_request(request, device=False)
    store = ActivationStore.open(request.cache)
    return _plan(request, store), store


def _check_trainable(config: RunConfig, request: TrainRequest, store: ActivationStore) -> None:
    """Refuse, before a run is made or continued, a device this machine lacks, SAEs that do not fit it, or
    ``--reader processes`` on a cache they cannot read, or a cache with chunk files gone (found by listing its
    folders; the stream would find one only when it reached it, hours into the run)."""
    pick_device(request.device)
    store.check_chunks_present(tokens=False)  # training reads no tokens
    check_processes_cache(request.reader, "reader", store)
    _check_fits(len(config.groups), config.n_latents, config.d_in, request,
                _largest_rank_windows(config, store, current_ranks().world))


_ROW_NUMBERS = ("train_fvu", "held_out_fvu", "l0", "held_out_l0", "dead_fraction", "tokens_per_s", "seconds")


def _summary_rows(run: Run) -> list[dict[str, Any]]:
    """A finished run's rows, as `gsae train` showed them: those of its summary.json, checked (a damaged file
    is one line naming it); [] for a summary of an older gsae without every figure of the table."""
    run.check_sae_files()  # a table of SAEs one of which is gone would say the run is fine
    summary = run.summary  # a file that is not JSON is one line already
    rows = summary.get("saes") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or len(rows) != len(run.config.groups) or not all(isinstance(r, dict) for r in rows):
        raise GsaeError(f"{run.url(SUMMARY)} is damaged (not a row per SAE); train the run again (pass --out for a "
                        "new one, or delete it)")
    def whole(row: dict[str, Any]) -> bool:
        return (isinstance(row.get("sae"), int) and isinstance(row.get("layers"), list)
                and all(isinstance(layer, int) for layer in row["layers"])
                and all(isinstance(row.get(key), (int, float)) for key in _ROW_NUMBERS))
    return rows if all(whole(row) for row in rows) else []


class TrainedAlready(Exception):
    """The run asked for is trained already: the same command again after it finished (or after a kill
    between its summary and the removal of its checkpoints)."""

    def __init__(self, run: Run):
        super().__init__(run.path)
        self.run = run


def _trained_already(run: Run) -> Exception:
    """What the same command finds at a finished run: nothing to train, once the checkpoints a kill
    between its summary.json and their removal left are gone (they doubled the run's size for good).
    Under torchrun rank 0 finds it, and tells the other ranks (:func:`_train`)."""
    with contextlib.suppress(GsaeError):  # the run is complete all the same
        run.remove_checkpoints()
    return TrainedAlready(run)


def _where(path: str) -> str:
    """A run's path as marks and configs record it: absolute for a local folder (found from any folder)."""
    return str(path) if "://" in str(path) else os.path.abspath(path)


def _plan_notes(request: TrainRequest, config: RunConfig, store: ActivationStore) -> list[str]:
    """What the plan does that the arguments did not say: tokens rounded up to whole batches, and SAEs
    that will see their rows more than once."""
    notes = []
    if request.l1_coefficient != L1_COEFFICIENT and config.architecture in TOP_K_ARCHITECTURES:
        notes.append(f"--l1-coefficient {request.l1_coefficient:g} is not used: a {config.architecture} SAE's "
                     "sparsity is its k")
    if request.k is not None and config.architecture not in TOP_K_ARCHITECTURES:
        notes.append(f"--k {request.k} is not used: a {config.architecture} SAE has no top-k (its L1 or L0 "
                     "penalty sets how many latents fire: --l1-coefficient)")
    if config.tokens_per_sae != request.tokens:
        notes.append(f"--tokens {request.tokens:,} → {config.tokens_per_sae:,} per SAE "
                     f"({config.steps:,} whole batch{'es' if config.steps != 1 else ''} of {config.batch_size:,})")
    try:  # what gsae eval will refuse, said before training rather than after
        check_held_out(store, config.eval_rows[0], EVAL_WINDOWS)
    except GsaeError as exc:
        notes.append(f"{exc} (`gsae eval` needs it; the held-out FVU of this run is from "
                     f"{config.eval_rows[1] - config.eval_rows[0]:,} rows)")
    rows = sum(min(store.chunk_rows(c)[1], store.n_tokens) - store.chunk_rows(c)[0] for c in config.train_chunks)
    fewest = min(len(group) for group in config.groups)  # the group with the fewest (token, layer) rows
    if config.tokens_per_sae > fewest * rows:
        notes.append(f"each SAE sees {config.tokens_per_sae:,} training rows; the cache holds {rows:,} tokens per "
                     f"layer for training, so an SAE of {fewest} layer(s) sees its rows "
                     f"{config.tokens_per_sae / (fewest * rows):.1f} times (a larger cache avoids repeats)")
    return notes


def _saes_of_ranks(config: RunConfig, world: int) -> list[list[int]]:
    """The SAEs each of ``world`` ranks trains (each wholly on one, balanced by tokens)."""
    owner = assign_ranks([config.tokens_per_sae] * len(config.groups), world)
    return [[i for i, rank in enumerate(owner) if rank == r] for r in range(world)]


def _largest_rank_windows(config: RunConfig, store: ActivationStore, world: int) -> int:
    """The window buffers of the rank of ``world`` whose SAEs' windows are the largest."""
    return max(_windows_bytes(config, store, saes) for saes in _saes_of_ranks(config, world))


def _windows_bytes(config: RunConfig, store: ActivationStore, saes: list[int]) -> int:
    """The window buffers of the streams of SAEs ``saes``: two windows each (on a GPU, and as many copies there),
    of its group's rows in ``window_chunks`` chunks and a batch in front for the rows carried."""
    itemsize = STORAGE_DTYPES[store.dtype][1]
    rows = sum(config.window_chunks * len(config.groups[i]) * store.chunk_tokens + config.batch_size for i in saes)
    return 2 * rows * store.d_model * itemsize


def _build(config: RunConfig, store: ActivationStore, device: torch.device, pool: ThreadPoolExecutor,
           indices: list[int], prefetch: bool, processes: ChunkProcesses | None = None) -> tuple[dict, dict, dict, dict]:
    """SAE i, its optimizer, stream and dead counters for each i of ``indices`` (seeded by i, so an SAE
    is the same whichever process trains it).  ``prefetch``: each stream starts decoding its first
    window before the optimizer is made (the first Adam of a process imports torch._dynamo: 1.4 s of
    Python on this CPU, while the decode threads release the GIL)."""
    saes, optimizers, streams, fired = {}, {}, {}, {}
    mean = store.leading_stats(len(config.train_chunks))[0]
    try:
        for i in indices:
            group = config.groups[i]
            sae = _new_sae(config, seed=config.seed + i)
            scales = [config.scales[layer] for layer in group]
            with torch.no_grad():  # b_dec at the (scaled) mean of the group's training rows
                sae.b_dec.copy_(torch.from_numpy(np.mean([mean[l] * s for l, s in zip(group, scales)], axis=0)))
            saes[i] = sae.to(device)
            streams[i] = TrainingStream(store, group, scales, config.train_chunks, config.batch_size, config.seed,
                                        stream_id=i, window_chunks=config.window_chunks, device=device, pool=pool,
                                        processes=processes)
            if prefetch:
                streams[i].prefetch()
            optimizers[i] = make_optimizer(sae, config.lr)
            fired[i] = torch.zeros(config.n_latents, dtype=torch.int64, device=device)
    except BaseException:  # the streams made so far stop decoding (the caller has none of them yet)
        for stream in streams.values():
            stream.close()
        raise
    return saes, optimizers, streams, fired


def _new_sae(config: RunConfig, seed: int = 0) -> SparseAutoencoder:
    """An SAE of the run's shape and architecture, its penalty weight included (seeded: its initial weights)."""
    return SparseAutoencoder(config.d_in, config.n_latents, config.architecture, k=config.k,
                             l1_coefficient=config.l1_coefficient, seed=seed)


def make_optimizer(sae: SparseAutoencoder, lr: float) -> torch.optim.Adam:
    """The SAE's Adam: torch's fused implementation (one kernel over every parameter) on the CPU and on
    CUDA.  On this CPU a 512 → 8192 k32 step took 169-186 against 184-206 ms with torch's default (batch
    2048; 325-371 against 336-402 ms at 4096; alternating runs); its weights after 6 steps differ from the
    default's by rounding (2.6e-8).  Its step count lives on the parameters' device, so no host sync."""
    fused = all(p.device.type in ("cpu", "cuda") for p in sae.parameters())
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)


def train_step(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               since_fired: torch.Tensor, dead_tokens: int, n_dead_hint: int | None = None,
               check_finite: bool = True, bf16: bool = False):
    """One step of the recipe: loss (with AuxK on dead latents), backward, parallel decoder gradient
    removed, clipping at 1, Adam, decoder rows back to unit norm, dead counters updated.

    With ``check_finite`` a non-finite loss returns None and changes nothing, at the price of a host
    sync; `gsae train` passes False and ``n_dead_hint`` and checks ``output.loss`` every few steps, so
    a CUDA step never waits for the device.  ``bf16``: the forward under bfloat16 autocast."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = sae.loss(x, dead=since_fired > dead_tokens, n_dead_hint=n_dead_hint)
    if check_finite and not torch.isfinite(output.loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    sae.remove_parallel_gradient()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    optimizer.step()
    sae.normalize_decoder()
    since_fired += x.shape[0]
    since_fired.masked_fill_(output.codes.active(sae.n_latents), 0)
    return output


class DeadCount:
    """The host's count of one SAE's dead latents, which AuxK needs on the host (its k, and the columns
    it searches), read ``LAG`` steps late so that the device's queue never runs dry: every step queues a
    copy of the step's count into pinned memory, and uses the count of ``LAG`` steps before.  The host waits
    for that copy only where it is more than ``LAG`` steps ahead of the device (then ``LAG`` steps of every
    SAE are still queued; the wait sleeps, leaving the cores to the decode).  The CPU gets the same counts,
    so a run's AuxK is the same on either device and after a resume (:meth:`state` goes into checkpoints).
    It used to be read at log steps only, up to 10 steps old, when the dead count can grow several times
    over."""

    LAG = 2

    def __init__(self, device: torch.device, state: Any = None):
        self.cuda = device.type == "cuda"
        if isinstance(state, dict):
            self.value, queued = int(state["value"]), [int(count) for count in state["queued"]]
        else:  # none yet, or a checkpoint of a gsae that kept only the value (an int)
            self.value, queued = int(state or 0), []
        self.queued: list[tuple[torch.Tensor, Any]] = [(torch.tensor(count), None) for count in queued]
        # pinned slots reused in turn: at most LAG + 1 counts are queued at once
        self.slots = ([torch.empty((), dtype=torch.int64, pin_memory=True) for _ in range(self.LAG + 1)]
                      if self.cuda else [])
        self.next_slot = 0

    def step(self, count: torch.Tensor) -> int:
        """Queue this step's ``count`` (a 0-d device tensor); the count to use now."""
        if self.cuda:
            host = self.slots[self.next_slot]
            self.next_slot = (self.next_slot + 1) % len(self.slots)
            host.copy_(count, non_blocking=True)
            done = torch.cuda.Event(blocking=True)
            done.record(torch.cuda.current_stream(count.device))  # the stream the copy was queued on
            self.queued.append((host, done))
        else:
            self.queued.append((count.clone(), None))
        while len(self.queued) > self.LAG:
            host, done = self.queued.pop(0)
            if done is not None:
                done.synchronize()  # recorded LAG steps ago: long passed, unless the host is far ahead
            self.value = int(host)
        return self.value

    def state(self) -> dict[str, Any]:
        """The value and the queued counts, for a checkpoint (waits for the queued copies)."""
        for _, done in self.queued:
            if done is not None:
                done.synchronize()
        return {"value": self.value, "queued": [int(host) for host, _ in self.queued]}


def _describe(group: list[int]) -> str:
    return f"L{layer_span(group)}"


def train(request: TrainRequest, console: Any) -> TrainResult:
    """Train every SAE of the run, one step of each in turn, with checkpoints.

    Under torchrun the SAEs are spread over the ranks (each wholly on one, balanced by tokens); each rank
    streams only its SAEs' layers, and rank 0 writes the run: the same files, and the same weights, as
    one process.  TF32 (the run's ``tf32``) holds for this call only (:func:`matmul_precision`)."""
    with contextlib.ExitStack() as scope:
        return _train(request, console, scope)


def _train(request: TrainRequest, console: Any, scope: contextlib.ExitStack) -> TrainResult:
    entered = time.perf_counter()
    ranks = current_ranks()
    if ranks.world > 1 and not request.out:  # every rank refuses before anything is made
        raise GsaeError("under torchrun, pass --out DIR: every rank must find the run")
    if ranks.first:
        try:
            run, store = _open_run(request, console, scope)  # locked until the SAE files and the summary are written
        except TrainedAlready as done:
            ranks.broadcast_from_first(True)  # the other ranks have nothing to train either
            return TrainResult(done.run.path, _summary_rows(done.run), 0.0, done.run.config.steps, trained_already=True)
        ranks.broadcast_from_first(False)
    else:
        if ranks.broadcast_from_first(None):  # rank 0 has created or checked the run, or found it trained already
            return TrainResult(request.out, rank=ranks.rank, trained_already=True)
        run = Run.open(request.out)
        store = _store_of(run.config, request.cache or run.config.cache, run.path)
        console = Console(quiet=True)
    config = run.config
    n = len(config.groups)
    mine = _saes_of_ranks(config, ranks.world)[ranks.rank]
    device = ranks.device(pick_device(config.device))
    scope.enter_context(matmul_precision(device, config.tf32))  # as sparsify's trainer sets it (--no-tf32: off)
    threads = ranks.decode_threads(store.path)
    pool = worker_threads(threads, "gsae-decode", worker_nice(device, "reader"))  # below the training thread
    # ranks on one machine share its /dev/shm; a rank with no SAE reads nothing
    processes = (start_processes(request.reader, "reader", store, device, ranks.local_world
                                 * _largest_rank_windows(config, store, ranks.world), threads) if mine else None)
    scope.callback(stop_processes, processes)  # also when the run fails
    checkpoint = run.latest_checkpoint()
    steps, batch_size = config.steps, config.batch_size
    start_step, elapsed = 0, [0.0] * n
    latest: list[dict[str, Any]] = [{} for _ in range(n)]  # each SAE's last metrics record
    dead_counts = {i: DeadCount(device) for i in mine}
    streams: dict[int, TrainingStream] = {}
    try:
        saes, optimizers, streams, fired = _build(config, store, device, pool, mine, prefetch=checkpoint is None,
                                                  processes=processes)
        if checkpoint is not None:
            state = Run.load_checkpoint(checkpoint, {i: (saes[i], optimizers[i], fired[i]) for i in mine})
            for i in mine:
                streams[i].load_state_dict(state["streams"][i])
            start_step, elapsed = state["step"], state["elapsed"]
            for i in mine:  # AuxK's host-side dead counts, queued ones included: a resume is exact
                dead_counts[i] = DeadCount(device, (state.get("n_dead") or [0] * n)[i])
                saes[i].threshold_updates = start_step  # (BatchTopK: one a step)
                if config.architecture == "batchtopk" and state.get("threshold") != THRESHOLD_KEPT and start_step:
                    # a checkpoint of a gsae that kept SAELens's m itself: as this one keeps it (helper-77)
                    with torch.no_grad():
                        saes[i].threshold.div_(1 - (1 - THRESHOLD_RATE) ** start_step)
            latest = state.get("latest") or latest
    except BaseException:  # a run that cannot start (a bad checkpoint, no memory) leaves no decode queued
        for stream in streams.values():
            stream.close()
        pool.shutdown(wait=False, cancel_futures=True)
        raise

    dead_tokens = config.dead_tokens
    nonfinite = {i: torch.zeros((), dtype=torch.bool, device=device) for i in mine}  # read every log step

    def check_finite(step: int) -> None:
        for i, flag in nonfinite.items():
            if bool(flag):
                raise GsaeError(
                    f"SAE {i} ({_describe(config.groups[i])}) hit a non-finite loss before step {step}; "
                    f"the last good checkpoint is kept in {run.path}/checkpoints (try a lower --lr)")

    def checkpoint_now(step: int) -> None:
        check_finite(step)  # never checkpoint a diverged SAE
        parts = ranks.gather_to_first({i: (pack_training_state(saes[i], optimizers[i], fired[i], moments=step < steps),
                                           streams[i].state_dict(), elapsed[i], dead_counts[i].state(), latest[i]) for i in mine})
        if parts is not None:
            run.save_checkpoint(step, {i: parts[i][0] for i in range(n)},
                                {"streams": [parts[i][1] for i in range(n)], "elapsed": [parts[i][2] for i in range(n)],
                                 "n_dead": [parts[i][3] for i in range(n)], "latest": [parts[i][4] for i in range(n)],
                                 "threshold": THRESHOLD_KEPT})
        ranks.barrier()

    last_checkpoint = time.monotonic()

    def checkpoint_due(done: int) -> bool:
        """Every --checkpoint-every steps, and once CHECKPOINT_SECONDS have passed since the last.  Under
        torchrun rank 0 decides every 10th log step, so that every rank takes it (a collective, as the log
        steps' gather; not one per step)."""
        if done % config.checkpoint_every == 0:
            return True
        if ranks.world > 1 and done % (10 * config.log_every):
            return False
        late = time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS
        return late if ranks.world == 1 else bool(ranks.broadcast_from_first(late))

    bf16 = config.precision == "bfloat16"
    progress = LoggedProgress(TextColumn("{task.description}"), BarColumn(), CountColumn(), RateColumn("tok"),
                              TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                              RemainingColumn(), console=console)
    started = time.perf_counter()
    waiting = 0.0  # of the steps' seconds, those spent waiting for a batch (the decode behind the SAEs)
    metrics = run.open_metrics(start_step) if ranks.first else contextlib.nullcontext(io.StringIO())
    try:
        with progress, metrics as log:
            done = start_step * batch_size
            tasks = {i: progress.add_task(f"SAE {i} {_describe(config.groups[i])}", total=steps * batch_size,
                                          completed=done, resumed_at=done, stats="") for i in mine}
            for step in range(start_step, steps):
                log_step = (step + 1) % config.log_every == 0 or step + 1 == steps
                for i in mine:
                    t0 = time.perf_counter()
                    batch = streams[i].next_batch()
                    waiting += time.perf_counter() - t0
                    n_dead = dead_counts[i].step((fired[i] > dead_tokens).sum())
                    output = train_step(saes[i], optimizers[i], batch.x, fired[i], dead_tokens, n_dead_hint=n_dead,
                                        check_finite=False, bf16=bf16)
                    nonfinite[i] |= ~torch.isfinite(output.loss.detach())
                    elapsed[i] += time.perf_counter() - t0
                    progress.update(tasks[i], completed=(step + 1) * batch_size)  # every step: no read back
                    if log_step:  # one read back per SAE (a host sync on CUDA), not one per figure
                        bad, loss, fvu, l0, dead = torch.stack([
                            nonfinite[i].float(), output.loss.detach().float(), output.fvu.float(),
                            output.codes.mean_l0(), (fired[i] > dead_tokens).sum().float()]).tolist()
                        if bad:
                            check_finite(step + 1)
                        tokens = (step + 1) * batch_size
                        latest[i] = {"step": step + 1, "sae": i, "layers": config.groups[i], "tokens": tokens,
                                     "loss": loss, "fvu": fvu, "l0": l0, "dead_fraction": dead / config.n_latents,
                                     "tokens_per_s": tokens / max(elapsed[i], 1e-9)}
                        progress.update(tasks[i], stats=(
                            f"FVU {latest[i]['fvu']:.3f} L0 {latest[i]['l0']:.0f} dead {100 * latest[i]['dead_fraction']:.0f}%"))
                if log_step:
                    records = ranks.gather_to_first({i: latest[i] for i in mine})
                    for i in sorted(records or {}):
                        log.write(json.dumps(records[i]) + "\n")
                if step + 1 < steps and checkpoint_due(step + 1):
                    log.flush()
                    checkpoint_now(step + 1)
                    last_checkpoint = time.monotonic()
    finally:  # an interrupted run keeps its last periodic checkpoint; --resume continues from there
        for stream in streams.values():
            stream.close()
        pool.shutdown(wait=False, cancel_futures=True)
        stop_processes(processes)
    wall = {"start": started - entered, "steps": time.perf_counter() - started, "waiting_for_data": waiting}
    mark = time.perf_counter()
    if start_step < steps:  # the final state, so a kill while the SAE files are written loses no step
        checkpoint_now(steps)
    wall["final_checkpoint"] = time.perf_counter() - mark
    rows = _finish(run, store, saes, latest, elapsed, device, ranks, wall)
    if ranks.first:  # the run is trained: its SAE files hold what the last checkpoint held
        try:
            run.remove_checkpoints()
        except GsaeError as exc:  # the run is complete all the same
            console.print(f"[yellow]note[/]: {exc}; the trained run's checkpoints/ was not removed (it may be deleted)")
    return TrainResult(run.path, rows, time.perf_counter() - started, start_step, ranks.rank,
                       turns=_saes_of_ranks(config, ranks.world))


def _finish(run: Run, store: ActivationStore, saes: dict[int, SparseAutoencoder], latest: list, elapsed: list[float],
            device: torch.device, ranks: Ranks, wall: dict[str, float]) -> list[dict[str, Any]]:
    """Each rank measures its SAEs' held-out FVU per layer; rank 0 saves every SAE, then the summary (the
    file that marks the run trained, with ``wall``: this process's seconds per phase).  Returns one row
    per SAE on rank 0."""
    config, parts = run.config, {}
    mark = time.perf_counter()
    threads = ranks.decode_threads(store.path)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gsae-eval") as pool:
        for i, sae in saes.items():
            sae.eval()  # BatchTopK: the per-token threshold, as evaluated and exported
            start = config.eval_rows[0]
            held_out = {layer: layer_reconstruction(sae, store, layer, config.scales[layer], start,
                                                    start + _SUMMARY_EVAL_ROWS, device, pool, threads)
                        for layer in config.groups[i]}
            per_layer = {layer: record["fvu"] for layer, record in held_out.items()}
            held_out_l0 = float(np.mean([record["l0"] for record in held_out.values()]))
            row = {"sae": i, "layers": config.groups[i], "train_fvu": latest[i].get("fvu"), "l0": latest[i].get("l0"),
                   "dead_fraction": latest[i].get("dead_fraction"),
                   "held_out_fvu": float(np.mean(list(per_layer.values()))),
                   "held_out_fvu_per_layer": {str(k): v for k, v in per_layer.items()},
                   # the L0 that held-out FVU was measured at (BatchTopK: its inference threshold, not k)
                   "held_out_l0": held_out_l0, "note": threshold_note(sae, config.groups[i], held_out_l0),
                   "seconds": elapsed[i], "tokens_per_s": latest[i].get("tokens_per_s")}
            parts[i] = (row, {name: t.detach().cpu() for name, t in sae.state_dict().items()})
    merged = ranks.gather_to_first(parts)
    wall["held_out_fvu"], mark = time.perf_counter() - mark, time.perf_counter()
    rows = []
    if merged is not None:
        for i, group in enumerate(config.groups):
            row, weights = merged[i]
            sae = _new_sae(config)
            sae.load_state_dict(weights)
            run.save_sae(i, sae, {"layers": group, "scales": {str(layer): config.scales[layer] for layer in group},
                                  "hook_names": [f"blocks.{l}.hook_resid_post" for l in group],
                                  "model_id": store.attrs.get("model_id"), "tokens": config.tokens_per_sae})
            rows.append(row)
        wall["save_saes"] = time.perf_counter() - mark
        run.write_summary({"label": config.label, "saes": rows, "train_seconds": sum(row["seconds"] for row in rows),
                           "wall_seconds": {name: round(seconds, 3) for name, seconds in wall.items()}})
    ranks.barrier()
    return rows
