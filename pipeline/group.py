"""`gsae group`: compute (or reuse) the grouping of a cache and write it next to the cache."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import __version__
from pipeline.errors import GsaeError, check_seed
from pipeline.grouping import (
    Grouping,
    build_grouping,
    compute_distances,
    parse_layers,
    sampled_from,
)
from pipeline.models import pick_device
from pipeline.requests import METRICS, GroupRequest
from pipeline.run import Run, cache_fingerprint, fingerprint_changes
from stores import ActivationStore, StoreError, list_side_files, read_side_file, remove_side_files, write_side_file

# 2: true contiguous complete linkage (format 1 came from scikit-learn's connectivity-constrained
# clustering, which is not complete linkage on a chain); files of another format are recomputed.
GROUPING_FORMAT = 2


@dataclass
class GroupResult:
    grouping: Grouping
    json_path: str
    pictures: list[str]
    reused: bool
    seconds: float
    notes: list[str]


class GroupingInUse(GsaeError):
    """A saved grouping that training runs use would be recomputed: refused without --force."""

    def __init__(self, problem: str, action: str, metric: str):
        super().__init__(f"{problem}; pass --force to {action}")
        self.problem, self.action, self.metric = problem, action, metric


def result_name(metric: str) -> str:
    return f"groups/{metric}.json"


class DamagedGrouping(GsaeError):
    """A grouping file that is not valid JSON, or of the current format but lacking what it must hold."""


def _listed(runs: list[str], shown: int = 3) -> str:
    """The first ``shown`` runs, and how many more: the line a user reads before choosing --force."""
    return ", ".join(runs[:shown]) + (f" and {len(runs) - shown:,} more" if len(runs) > shown else "")


def _read_record(store: ActivationStore, metric: str) -> dict[str, Any] | None:
    """The saved record for ``metric`` as it is (any format), None if there is none; a file that is not a
    JSON object, or of the current format and incomplete, raises :class:`DamagedGrouping`."""
    data = read_side_file(store, result_name(metric))
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:  # not JSON, truncated, not UTF-8
        record, problem = None, "not valid JSON"
    else:
        problem = None if isinstance(record, dict) else "not a JSON object"
    if problem is None and record.get("format") == GROUPING_FORMAT:
        try:
            Grouping.from_json(record)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        raise DamagedGrouping(f"{store.path}/{result_name(metric)} is damaged ({problem}); re-run `gsae group "
                              f"--cache {store.path} --metric {metric} --force` to recompute it")
    return record


def _draw_pictures(store: ActivationStore, metric: str, grouping: Grouping) -> dict[str, str]:
    """Draw the distance heatmap and the AMAD curve next to the cache; their names and SHA-256."""
    from pipeline.plots import amad_curve, distance_heatmap  # matplotlib: only when pictures are drawn

    title = f"{store.attrs.get('model_id')} · {grouping.sample['tokens']:,} tokens"
    hashes = {}
    for name, draw in ((f"groups/{metric}-distance.png", distance_heatmap), (f"groups/{metric}-amad.png", amad_curve)):
        picture = draw(grouping, title)
        write_side_file(store, name, picture)
        hashes[name] = hashlib.sha256(picture).hexdigest()
    return hashes


def _pictures_stale(store: ActivationStore, record: dict[str, Any]) -> bool:
    """Whether a record's pictures are not the ones drawn with it: a kill after drawing a later grouping's
    and before writing its record leaves them (they are drawn first).  Records of a gsae that kept no
    hashes are taken as they are."""
    hashes = record.get("picture_sha256")
    if not isinstance(hashes, dict):
        return False
    for name, digest in hashes.items():
        picture = read_side_file(store, name)
        if picture is None or hashlib.sha256(picture).hexdigest() != digest:
            return True
    return False


def grouping_record(store: ActivationStore, metric: str) -> dict[str, Any] | None:
    """The record saved next to the cache for ``metric`` (grouping, arguments, seconds), if any of the
    current format; a damaged one is a one-line :class:`GsaeError` naming the file."""
    record = _read_record(store, metric)
    return record if record is not None and record.get("format") == GROUPING_FORMAT else None


def _users_folder(metric: str) -> str:
    return f"groups/used_by/{metric}"


def mark_used(store: ActivationStore, metric: str, run: str) -> None:
    """Record that ``run`` trained on the ``metric`` grouping: one small file per run, written whole, so
    runs started at the same time (torchrun, several jobs) never overwrite each other's mark."""
    name = hashlib.sha256(run.encode()).hexdigest()[:16]
    write_side_file(store, f"{_users_folder(metric)}/{name}.json", json.dumps({"run": run}).encode())


def runs_using(store: ActivationStore, metric: str, record: dict[str, Any] | None = None) -> list[str]:
    """The runs marked as using the ``metric`` grouping (and those an older record listed in ``used_by``)."""
    runs = list((record or {}).get("used_by", []))
    for name in list_side_files(store, _users_folder(metric)):
        if not name.endswith(".json"):  # a mark being written by another run (its hidden temporary)
            continue
        data = read_side_file(store, f"{_users_folder(metric)}/{name}")
        if data is None:
            continue
        try:
            runs.append(str(json.loads(data)["run"]))
        except (ValueError, KeyError, TypeError):  # a damaged mark still says that some run uses the grouping
            runs.append(f"{_users_folder(metric)}/{name} (unreadable)")
    fingerprint = cache_fingerprint(store)
    return sorted(run for run in set(runs) if _may_use(run, fingerprint, metric))


def _may_use(run: str, fingerprint: dict[str, Any], metric: str) -> bool:
    """Whether a marked run may still hold the grouping of ``metric`` on the cache of ``fingerprint``.  Not a
    run deleted since, or never made (its --out was a file: the mark comes first), nor one replaced by a run
    of another metric or cache (`gsae train` replaces a run stopped before its first checkpoint).  Only
    absolute local paths can be told: older marks and object storage are kept, and so is a run whose config
    cannot be read."""
    if not os.path.isabs(run):
        return True
    try:
        config = Run.read_config(run)
    except (GsaeError, OSError):
        return True
    return config is not None and config.metric == metric and not fingerprint_changes(config.cache_fingerprint, fingerprint)


def load_grouping(store: ActivationStore, metric: str) -> Grouping | None:
    """The grouping saved next to the cache for ``metric``, if any."""
    record = grouping_record(store, metric)
    return Grouping.from_json(record) if record is not None else None


def _arguments(request: GroupRequest, layers: list[int], tokens: int, store: ActivationStore) -> dict[str, Any]:
    return {"metric": request.metric, "tokens": tokens, "threshold": request.threshold, "layers": layers,
            "seed": request.seed, "cache_tokens": store.n_tokens}


def _import_quietly(module: str) -> None:
    """Import ``module`` ahead of its use; a failure shows where it is imported for use."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001
        pass


def _sample_note(tokens: int, grouping: Grouping) -> list[str]:
    """A note when the sample holds more rows than --tokens asked for: chunks are sampled whole."""
    sampled, chunks = int(grouping.sample.get("tokens", 0)), len(grouping.sample.get("chunks", []))
    if sampled <= tokens:
        return []
    return [f"--tokens {tokens:,}: whole chunks are sampled, so D is over {sampled:,} tokens "
            f"({chunks:,} chunk{'s' if chunks != 1 else ''})"]


def run_group(request: GroupRequest, console: Any) -> GroupResult:
    """Compute D from sampled chunks, the partitions for every G and the AMAD curve; save them."""
    if request.metric not in METRICS:
        raise GsaeError(f"--metric must be amad or uniform (got {request.metric})")
    if not 0 < request.threshold < 1:
        raise GsaeError(f"--threshold must be between 0 and 1 (got {request.threshold})")
    check_seed(request.seed)
    if not request.scheduler:  # with a scheduler, each worker picks its own (auto) or must have CUDA (cuda)
        pick_device(request.device)  # `--device cuda` without CUDA: refused before any work
    if request.tokens <= 0:
        raise GsaeError(f"--tokens must be positive (got {request.tokens})")
    store = ActivationStore.open(request.cache, allow_partial=request.allow_partial)
    if store.n_tokens == 0:
        raise GsaeError(f"cache {request.cache} holds no rows yet")
    layers = parse_layers(request.layers, store.n_layers)
    notes = []
    tokens = min(request.tokens, store.n_tokens)  # as the grouping's arguments record it
    candidates = sampled_from(store)
    rows = sum(stop - start for start, stop in map(store.readable_rows, candidates))
    all_rows = []  # the note that all the rows to sample are used
    if request.tokens > rows:
        # the default too, so not "--tokens" (nothing may have been typed), as gsae eval words it
        held_out = store.n_chunks - len(candidates)
        all_rows.append(f"the cache holds {rows:,} tokens to sample (fewer than the {request.tokens:,} asked"
                        + (f"; its last {f'{held_out:,} chunks are' if held_out != 1 else 'chunk is'} held out for "
                           "evaluation, and not sampled" if held_out else "") + f"): using all {rows:,}")
    arguments = _arguments(request, layers, tokens, store)

    try:
        existing = _read_record(store, request.metric)
    except DamagedGrouping as exc:  # recomputed like a file of an older format, but not under a run's feet
        users = runs_using(store, request.metric)
        if users and not request.force:
            raise GroupingInUse(f"{store.path}/{result_name(request.metric)} is damaged and training runs use it "
                                f"({_listed(users)})", "recompute it", request.metric) from None
        notes.append(f"{str(exc).split(';')[0]}; recomputing it")
        existing = None
    if existing is not None and existing.get("format") != GROUPING_FORMAT:
        notes.append(f"{result_name(request.metric)} was made by an older gsae (grouping format "
                     f"{existing.get('format', 1)}, now {GROUPING_FORMAT}); recomputing it")
        existing = None
    if existing is not None:
        if existing.get("arguments") == arguments and not request.force:
            grouping = Grouping.from_json(existing)
            if _pictures_stale(store, existing):  # a kill between drawing them and writing the record
                try:
                    existing["picture_sha256"] = _draw_pictures(store, request.metric, grouping)
                    write_side_file(store, result_name(request.metric), json.dumps(existing, indent=1).encode())
                except StoreError:  # a cache this process may not write (read-only storage): used as it is
                    notes.append(f"the pictures beside {result_name(request.metric)} are not those of its grouping, "
                                 "and cannot be redrawn here (the cache is not writable)")
            held_out = sorted(set(grouping.sample.get("chunks", [])) - set(candidates))
            if not held_out:
                notes = all_rows + notes
            else:  # kept: runs may use it; the arguments are the same
                notes.append(f"this grouping was made by an earlier gsae, which sampled the held-out chunks too "
                             f"({', '.join(map(str, held_out[:5]))}{' ...' if len(held_out) > 5 else ''}): `gsae group "
                             f"--metric {request.metric} --force` samples the training chunks only")
            return GroupResult(grouping, f"{store.path}/{result_name(request.metric)}",
                               [f"{store.path}/{name}" if name.startswith("groups/") else name  # older: full paths
                                for name in existing.get("pictures", [])],
                               True, 0.0, notes + _sample_note(tokens, grouping))
        users = runs_using(store, request.metric, existing)
        if users and not request.force:
            raise GroupingInUse(f"{store.path}/{result_name(request.metric)} was made with other arguments and "
                                f"training runs use it ({_listed(users)})", "replace it", request.metric)

    started = time.perf_counter()
    # matplotlib takes ~0.4 s to import: done on a thread of its own while the distances are computed
    plotting = threading.Thread(target=_import_quietly, args=("pipeline.plots",), daemon=True)
    plotting.start()
    with console.status(f"computing layer distances over {min(tokens, rows):,} sampled tokens ..."):  # (held-out rows not sampled)
        try:
            distance, sample = compute_distances(store, layers, tokens, request.seed, request.scheduler, request.device)
        except torch.cuda.OutOfMemoryError:
            raise GsaeError("the GPU ran out of memory computing the layer distances; pass --device cpu") from None
    grouping = build_grouping(request.metric, layers, distance, request.threshold, sample)
    seconds = time.perf_counter() - started
    notes = all_rows + notes + _sample_note(tokens, grouping)

    plotting.join()
    hashes = _draw_pictures(store, request.metric, grouping)
    names = list(hashes)
    # the record names them inside the cache (as written, they would be relative to the folder group ran in)
    record = {"format": GROUPING_FORMAT, **grouping.to_json(), "arguments": arguments, "seconds": round(seconds, 3),
              "pictures": names, "picture_sha256": hashes, "gsae_version": __version__}
    path = write_side_file(store, result_name(request.metric), json.dumps(record, indent=1).encode())
    pictures = [f"{store.path}/{name}" for name in names]
    remove_side_files(store, _users_folder(request.metric))  # the runs keep their own record of the old one
    return GroupResult(grouping, path, pictures, False, seconds, notes)
