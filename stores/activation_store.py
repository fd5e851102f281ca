"""The on-disk activation store: one Zarr v3 group per cache (layout in docs/store-format.md).

Writers create the store, write whole chunks (every layer's chunk, the tokens and the per-chunk
statistics) and then commit the chunk.  One writer commits by advancing ``chunks_written`` in the group
attributes; several writers (``gsae cache`` under torchrun) each write a commit marker per chunk,
``commits/<chunk>_<rows>.json``, and only the first rank touches the attributes, at :meth:`finalize`.
Zarr's local store replaces files atomically and object stores write an object whole, so a killed
writer leaves at worst an uncommitted chunk that the resumed run overwrites with the same bytes.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import functools
import json
import math
import os
import re
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from stores import chunk_io
from stores.chunk_files import ChunkProcesses, ProcessStopped, usable_cores
from stores.chunk_stats import ChunkStats
from stores.codecs import STORAGE_DTYPES, activation_codecs, quiet_numcodecs, small_array_codecs
from stores.locks import held_by_another
from stores.messages import first_line
from stores.remote import describe_storage_error, join, write_whole


FORMAT_NAME = "gsae-activations"
FORMAT_VERSION = 1
TARGET_CHUNK_BYTES = 4 * 2**20
COMMITS = "commits"  # the folder of per-chunk commit markers (stores written by several writers)
_MARKER = re.compile(r"^(\d+)_(\d+)\.json$")  # commits/<chunk>_<rows>.json: a listing alone tells the rows


class StoreError(Exception):
    """A problem with a store that the user can fix; its message is one line."""


class IncompleteCache(StoreError):
    """A cache whose planned tokens are not all written yet; ``attrs`` hold its recipe (the command that
    finishes it can be rebuilt from them: ``pipeline.cache.cache_command``)."""

    def __init__(self, message: str, path: str, attrs: dict[str, Any]):
        super().__init__(message)
        self.path, self.attrs = path, attrs

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (a Dask worker's error comes back to the client)
        return type(self), (str(self), self.path, self.attrs)


class DamagedCache(StoreError):
    """A gsae cache's own folders under a root zarr.json that is gone or unreadable."""


#: a cache smaller than this many 4 MiB chunks is cut into about this many (see default_chunk_tokens)
SMALL_CACHE_CHUNKS = 20
#: ... cut first into chunks of at least this many rows and two windows, then made equal (so at least half that)
MIN_CHUNK_TOKENS = 256


def default_chunk_tokens(d_model: int, dtype: str, n_tokens: int | None = None, rows_per_window: int = 0) -> int:
    """Rows per chunk so that one chunk is about 4 MiB uncompressed; for a cache of ``n_tokens`` smaller than
    :data:`SMALL_CACHE_CHUNKS` such chunks, about that many chunks of equal size: the cache cut into chunks of
    at least :data:`MIN_CHUNK_TOKENS` rows and two windows of ``rows_per_window``, then made equal, so each
    holds more than half that: at least one whole window.

    Why: training holds out the last ~5% of the chunks, at least one, and needs one more to train on; the
    held-out chunk is evaluated in whole windows.  A 20,000-token cache of a model with d_model 64 was one
    4 MiB chunk, which `gsae train` refused.  Equal chunks: a short last one made a held-out slice of a few rows."""
    rows = max(1, TARGET_CHUNK_BYTES // (d_model * STORAGE_DTYPES[dtype][1]))
    if n_tokens is not None and n_tokens < SMALL_CACHE_CHUNKS * rows:
        rows = min(rows, max(MIN_CHUNK_TOKENS, 2 * rows_per_window, -(-n_tokens // SMALL_CACHE_CHUNKS)))
        rows = -(-n_tokens // -(-n_tokens // rows))  # the same number of chunks, of equal size
    return rows


def _local_files(path: Path | str, follow_symlinks: bool = False) -> Iterator[tuple[str, int]]:
    """(path, size) of every file under ``path`` (none where there is no such folder), by ``os.scandir``.  With
    ``follow_symlinks``, a linked folder is walked and a linked file counted as zarr reads them (a broken link is
    no file), each folder once."""
    folders, seen = [str(path)], set()
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # a file removed meanwhile (a temporary), a broken link
                    if entry.is_dir(follow_symlinks=follow_symlinks):
                        if follow_symlinks:
                            info = entry.stat()
                            if (info.st_dev, info.st_ino) in seen:  # a link loop
                                continue
                            seen.add((info.st_dev, info.st_ino))
                        folders.append(entry.path)
                    else:
                        yield entry.path, entry.stat(follow_symlinks=follow_symlinks).st_size


def _local_bytes(path: Path) -> int:
    """The sizes of the files under ``path`` (0 where there is none).  fsspec's ``du`` took 36 µs a file
    here, this walk 10 µs: 0.1 s of a 1M-token cache's summary of Pythia-70M's shape (1,700 files), 4 s of
    a 100M-token one."""
    return sum(size for _, size in _local_files(path))


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local_path(path: str) -> Path:
    return Path(str(path).removeprefix("file://"))


def absolute_url(path: str) -> str:
    """``path`` as another process with another working directory opens it (a Dask worker): a local path made
    absolute, a URL as it is."""
    return str(_local_path(path).absolute()) if is_local(path) else str(path)


def _zarr_path(path: str) -> str:
    """What zarr opens: a local cache by its path, also one named by a file:// URL (zarr 3.1 took that for an
    fsspec store: its creation deleted the folder and then failed on the first file, and the chunk files took
    zarr's slow path, not gsae's own)."""
    return str(_local_path(path)) if is_local(path) else str(path)


def writer_lock_file(path: str) -> str | None:
    """The file `gsae cache` holds an flock on while it writes a local cache: ``.<name>.lock`` beside the cache
    folder (inside it, zarr's creation of the store would remove it), one whichever path names the cache; None
    for object storage, where nothing is locked."""
    if not is_local(path):
        return None
    folder = _local_path(path).resolve()
    return str(folder.parent / f".{folder.name}.lock")


def being_written(path: str) -> bool:
    """Whether another process (a `gsae cache`) holds the cache's writer lock now."""
    lock = writer_lock_file(path)
    return lock is not None and held_by_another(lock)


CREATING = "creating"  # attribute of a store whose arrays are not all made yet
CHUNK_STATS = ("chunk_sum", "chunk_norm_sum", "chunk_overflow")  # stats/<name>: one entry per chunk
_STATS_BLOCK = 256  # chunks of per-chunk statistics read at a time (a block of SmolLM2's is 35 MB)
_REQUIRED_ATTRIBUTES = ("n_layers", "d_model", "dtype", "chunk_tokens", "tokens_planned", "tokens_written",
                        "chunks_written", "complete")


def looks_like_cache(path: str) -> bool:
    """Whether ``path`` holds a cache's own folders (``layers``, ``tokens``, ``stats``), whatever its
    zarr.json says."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return all(fs.exists(f"{root.rstrip('/')}/{name}") for name in ("layers", "tokens", "stats"))


def probe(path: str) -> str:
    """``"absent"`` (nothing there, or an empty folder), ``"store"`` (a gsae cache), else raise."""
    fs, root = fsspec.core.url_to_fs(str(path))
    fs.invalidate_cache(root)  # s3fs caches listings: a store another process wrote since must show
    if not fs.exists(root):
        return "absent"
    if fs.isfile(root):
        raise StoreError(f"{path} is a file, not a gsae cache; choose another --cache")
    if not fs.ls(root):
        return "absent"
    try:
        group = zarr.open_group(_zarr_path(path), mode="r")
    except Exception as exc:
        # refused, not damaged (an object store that lets a key list but not read): a good cache must not
        # look like one to re-create
        refused = describe_storage_error(exc) or (isinstance(exc, PermissionError) and f"permission denied ({exc.strerror or exc})")
        if refused:
            raise StoreError(f"cannot read {path}'s zarr.json: {refused}") from None
        # a cache's own folders with a root zarr.json that is gone or unreadable: damaged, not foreign
        if looks_like_cache(str(path)):
            raise DamagedCache(f"{path} looks like a gsae cache whose zarr.json is missing or damaged; restore the "
                               "cache from a copy or re-create it with `gsae cache`") from None
        raise StoreError(f"{path} holds something that is not a gsae cache; choose another --cache") from None
    if group.attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is a Zarr group but not a gsae cache; choose another --cache")
    if group.attrs.get(CREATING):  # a creation killed before its arrays were all made
        return "absent"
    return "store"


def _missing_bucket(path: str) -> str | None:
    """What to do where ``path``'s bucket is not there (`gsae cache` would fail on it too), or None: a local
    path, a bucket that is there, or one that cannot be told."""
    protocol, _, rest = str(path).partition("://")
    if not rest or protocol not in ("s3", "s3a", "gs", "gcs"):  # (hf://datasets/...: no bucket there)
        return None
    bucket = rest.split("/", 1)[0]
    try:
        fs = fsspec.core.url_to_fs(str(path))[0]
        if fs.exists(bucket):
            return None
    except Exception:  # no credentials to tell, say: the line stays as it was
        return None
    # (s3fs answers False for a bucket it could not ask about too: throttled, a wrong endpoint)
    return f"its bucket {bucket} was not found (or cannot be seen with these credentials, or at this endpoint)"


def _write_error(path: str, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {path}; free space and re-run the same command to resume")
    return StoreError(f"cannot write to {path}: {exc.strerror or exc}")


class FirstFailure:
    """The first error among one writer's writes: once a write has failed, the threads' writes not yet begun,
    and the encoder processes' not yet handed to them, fail the same way without writing (what the processes
    were sent, they finish).  A full disk then stops the threads' writes at once, in the worker thread that
    saw it, rather than when the committing thread next looks (under load that thread came up to ~100 ms
    later, and the pool had begun more of the failed chunk's writes and the next chunks')."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def run(self, job: Callable[..., Any], *args: Any) -> Any:
        """``job(*args)`` on a writer thread, unless a write has failed."""
        if self.error is not None:
            raise copy.copy(self.error)  # a copy: tracebacks are not shared between threads
        try:
            return job(*args)
        except BaseException as exc:
            self.note(exc)
            raise

    def note(self, error: BaseException | None) -> None:
        if error is not None and self.error is None:
            self.error = error

    def handed(self, start: Callable[[], Future]) -> Future:
        """``start()``'s future (a write in an encoder process), or a failed one without starting it where a
        write has failed; its failure is noted."""
        if self.error is not None:
            future: Future = Future()
            future.set_exception(copy.copy(self.error))
            return future
        future = start()
        future.add_done_callback(lambda done: self.note(None if done.cancelled() else done.exception()))
        return future


@dataclass
class PendingChunk:
    """A chunk whose writes were started by :meth:`ActivationStore.start_chunk`, not yet committed."""

    chunk: int
    stop: int  # the row after its last row
    futures: list[Future]
    stats: ChunkStats | None = None  # what is written to stats/ for it, added to the running totals at commit

    def done(self) -> bool:
        return all(future.done() for future in self.futures)


class ActivationStore:
    """A gsae activation cache. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: str, group: zarr.Group):
        self.path = str(path)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        missing = [key for key in _REQUIRED_ATTRIBUTES if key not in self.attrs]
        if missing:
            raise StoreError(f"cache {self.path}: zarr.json lacks the attribute {missing[0]!r}; the cache is damaged: "
                             "restore it from a copy or re-create it with `gsae cache`")
        self._check_attribute_values()
        # opened once: indexing the group re-reads an array's metadata every time
        self._layers = [self._open_array(f"layers/{layer}") for layer in range(self.n_layers)]
        self._tokens = self._open_array("tokens")
        self._chunk_stats = {name: self._open_array(f"stats/{name}") for name in CHUNK_STATS}
        self._check_layout()
        self._unchecked: dict[str, zarr.Array] | None = None  # write handles, see chunk_io._write_target
        # chunk -> rows of every committed chunk; a complete store needs no list (all rows are committed)
        self._committed: dict[int, int] = {}
        self.markers = False  # commits are per-chunk markers (several writers), not the attribute counter
        if not self.complete:
            self.refresh_commits()
        self._next_to_start = self.chunks_written
        # (chunks, sums) of stats/ over chunks 0..chunks-1, added in that order as this process commits them
        # from chunk 0: finalize then reads no per-chunk statistics back (a file per chunk and statistic,
        # 0.36 ms each here: 0.26 s for a 1M-token cache of Pythia-70M's shape, 27 s for 100M)
        self._totals: tuple[int, list[np.ndarray]] | None = None
        self._leading: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # leading_stats of a complete store

    def _damaged(self, what: str) -> StoreError:
        return StoreError(f"cache {self.path}: zarr.json's {what}; the cache is damaged: restore it from a copy or "
                          "re-create it with `gsae cache`")

    def _check_attribute_values(self) -> None:
        """Attributes of the right kind: an edited or damaged zarr.json ("tokens_written": "abc", "chunk_tokens": 0)
        failed deep inside a reader with Python's own words (int(), division by zero, a negative dimension)."""
        a = self.attrs
        for key, least in (("n_layers", 1), ("d_model", 1), ("chunk_tokens", 1), ("tokens_planned", 1),
                           ("tokens_written", 0), ("chunks_written", 0)):
            if not isinstance(a[key], int) or isinstance(a[key], bool) or a[key] < least:
                kind = "a positive whole number" if least else "a whole number ≥ 0"
                raise self._damaged(f"{key} is {a[key]!r}, not {kind}")
        if not isinstance(a["complete"], bool):
            raise self._damaged(f"complete is {a['complete']!r}, not true or false")
        if a["dtype"] not in STORAGE_DTYPES:
            raise self._damaged(f"dtype is {a['dtype']!r}, not one of {', '.join(STORAGE_DTYPES)}")

    def _check_layout(self) -> None:
        """Attributes that agree with the arrays: a complete store's arrays hold exactly its rows (finalize shrinks
        them to what was written); an incomplete one's the rows planned, or fewer, but never fewer than its committed
        rows, array by array: a finalize killed after shrinking some or all of them but before it marked the store
        complete (the same command shrinks them again and completes it), or a reader that opens the store while
        another process finalizes it."""
        first = self._layers[0]
        for array in self._layers:
            if array.ndim != 2 or array.shape[-1] != self.d_model:
                raise self._damaged(f"d_model is {self.d_model}, but its layers hold rows of {array.shape[-1]}")
        if first.chunks[0] != self.chunk_tokens:
            raise self._damaged(f"chunk_tokens is {self.chunk_tokens:,}, but its layers' chunks hold "
                                f"{first.chunks[0]:,} rows")
        a = self.attrs
        arrays = [*self._layers, self._tokens]
        if self.complete:
            rows = first.shape[0]
            for array in arrays:
                if array.shape[0] != rows:
                    raise self._damaged(f"arrays differ in rows ({array.path}: {array.shape[0]:,}, "
                                        f"{first.path}: {rows:,})")
            if a["tokens_written"] != rows or a["chunks_written"] != -(-rows // self.chunk_tokens):
                raise self._damaged(f"counts ({a['tokens_written']:,} tokens in {a['chunks_written']:,} chunks) "
                                    f"do not match its complete arrays ({rows:,} rows, chunks of "
                                    f"{self.chunk_tokens:,})")
            return
        for array in arrays:
            if not a["tokens_written"] <= array.shape[0] <= a["tokens_planned"]:
                raise self._damaged(f"counts ({a['tokens_written']:,} of {a['tokens_planned']:,} tokens planned) do "
                                    f"not match its arrays ({array.path}: {array.shape[0]:,} rows)")

    def _open_array(self, name: str) -> zarr.Array:
        """The array ``name`` of the store; damaged or missing metadata (``<name>/zarr.json``) is a
        :class:`StoreError` naming it."""
        try:
            with quiet_numcodecs():
                array = self.group[name]
        except Exception as exc:  # JSON that does not parse, metadata that zarr refuses, a missing file
            if isinstance(exc, KeyError):  # no such array, or metadata without a field zarr needs
                problem = "is missing" if exc.args and exc.args[0] == name else f"lacks the field {exc.args[0]!r}"
            elif isinstance(exc, json.JSONDecodeError):
                problem = "is not valid JSON"
            else:
                problem = f"cannot be read ({first_line(exc, 120)})"
            raise StoreError(f"cache {self.path}: {name}/zarr.json {problem}; the cache is damaged: restore it "
                             "from a copy or re-create it with `gsae cache`") from None
        if not isinstance(array, zarr.Array):
            raise StoreError(f"cache {self.path}: {name}/zarr.json describes a group, not an array; the cache is "
                             "damaged: restore it from a copy or re-create it with `gsae cache`")
        return array

    # ---------------------------------------------------------------- creation and opening
    @classmethod
    def create(
        cls,
        path: str,
        *,
        n_layers: int,
        d_model: int,
        n_tokens: int,
        chunk_tokens: int,
        dtype: str = "float16",
        compression: str = "lossless",
        keep_bits: int | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> "ActivationStore":
        """Create an empty, incomplete store at ``path`` (which must be absent or empty)."""
        with quiet_numcodecs():
            chain = activation_codecs(compression, dtype, *([keep_bits] if keep_bits is not None else []))
        n_chunks = math.ceil(n_tokens / chunk_tokens)
        array_dtype = STORAGE_DTYPES[dtype][0]
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **(attributes or {}),
            "n_layers": n_layers,
            "d_model": d_model,
            "dtype": dtype,
            "array_dtype": array_dtype,
            "codec": chain.description,
            "chunk_tokens": chunk_tokens,
            "tokens_planned": n_tokens,
            "tokens_written": 0,
            "chunks_written": 0,
            "complete": False,
        }
        write_cfg = {"write_empty_chunks": True}
        try:
            # marked as being created until every array exists: a kill in between leaves a folder that
            # probe() reports absent, so the same command creates it again
            group = zarr.open_group(_zarr_path(path), mode="w", attributes={"format": FORMAT_NAME, CREATING: True})
            group.create_array(
                "tokens", shape=(n_tokens,), chunks=(chunk_tokens,), dtype="int32",
                compressors=small_array_codecs(), fill_value=0, config=write_cfg,
            )
            layers = group.create_group("layers")
            for layer in range(n_layers):
                with quiet_numcodecs():
                    layers.create_array(
                        str(layer), shape=(n_tokens, d_model), chunks=(chunk_tokens, d_model), dtype=array_dtype,
                        filters=chain.filters, compressors=chain.compressors, fill_value=0, config=write_cfg,
                    )
            stats = group.create_group("stats")
            for name, shape, dt in zip(CHUNK_STATS, [(n_chunks, n_layers, d_model), (n_chunks, n_layers),
                                                     (n_chunks, n_layers)], ["float64", "float64", "int64"]):
                stats.create_array(
                    name, shape=shape, chunks=(1, *shape[1:]), dtype=dt,
                    compressors=small_array_codecs(), fill_value=0, config=write_cfg,
                )
            group.attrs.put(attrs)  # the whole set at once, CREATING gone
        except OSError as exc:
            raise _write_error(str(path), exc) from None
        return cls(str(path), group)

    @classmethod
    def open(cls, path: str, *, mode: str = "r", allow_partial: bool = False) -> "ActivationStore":
        """Open an existing cache; refuse an incomplete one unless ``allow_partial``."""
        if probe(path) != "store":
            if being_written(path):  # made while its model loads: the folder is there, the store not yet
                raise StoreError(f"the gsae cache at {path} is being made by another `gsae cache` now, which has not "
                                 "written its first chunk yet; wait for it")
            raise StoreError(f"no gsae cache at {path}; " + (_missing_bucket(path) or "create one with `gsae cache`"))
        group = zarr.open_group(_zarr_path(path), mode=mode)
        version = group.attrs.get("format_version")
        if version != FORMAT_VERSION:  # before its arrays are opened: another format may lay them out otherwise
            raise StoreError(f"{path} has store format {version}, this gsae reads {FORMAT_VERSION}")
        store = cls(str(path), group)
        if not store.complete and not allow_partial:
            # (only `gsae group` and `gsae verify` have --allow-partial: the hints must hold for every caller)
            if being_written(path):
                raise IncompleteCache(
                    f"cache {path} is being written by another `gsae cache` now ({store.tokens_committed:,} of "
                    f"{store.tokens_planned:,} tokens so far); wait for it to finish (`gsae group` and `gsae verify` "
                    "can use its committed part with --allow-partial)", str(path), dict(store.attrs))
            raise IncompleteCache(
                f"cache {path} is incomplete ({store.tokens_committed:,} of {store.tokens_planned:,} tokens); "
                "re-run its `gsae cache` command to finish it (`gsae group` and `gsae verify` can use its "
                "committed part with --allow-partial)", str(path), dict(store.attrs))
        return store

    # ---------------------------------------------------------------- properties
    n_layers = property(lambda self: int(self.attrs["n_layers"]))
    d_model = property(lambda self: int(self.attrs["d_model"]))
    dtype = property(lambda self: str(self.attrs["dtype"]))
    chunk_tokens = property(lambda self: int(self.attrs["chunk_tokens"]))
    tokens_planned = property(lambda self: int(self.attrs["tokens_planned"]))
    complete = property(lambda self: bool(self.attrs["complete"]))

    @property
    def chunks_written(self) -> int:
        """Chunks of the committed prefix: every chunk before it is committed (all chunks when complete).

        With several writers the committed chunks need not be a prefix while the store is written;
        partial readers see the prefix only, and :meth:`committed_chunks` lists them all."""
        if self.complete:
            return int(self.attrs["chunks_written"])
        return self._prefix()[0]

    @property
    def tokens_written(self) -> int:
        """Rows of the committed prefix (all rows when complete)."""
        if self.complete:
            return int(self.attrs["tokens_written"])
        return self._prefix()[1]

    @property
    def tokens_committed(self) -> int:
        """Rows of every committed chunk: with several writers (torchrun) more than :attr:`tokens_written`, the
        prefix readers use, until the store is complete."""
        return self.tokens_written if self.complete else sum(self._committed.values())

    def _prefix(self) -> tuple[int, int]:
        chunks, rows = 0, 0
        while chunks in self._committed:
            start, stop = self.chunk_rows(chunks)
            rows = start + self._committed[chunks]
            chunks += 1
            if rows < stop:  # a short chunk (the corpus ran out) ends the store
                break
        return chunks, rows

    def committed_chunks(self) -> dict[int, int]:
        """Every committed chunk and its rows, as known since the last :meth:`refresh_commits`."""
        if self.complete:
            return {chunk: min(self.chunk_rows(chunk)[1], self.tokens_written) - chunk * self.chunk_tokens
                    for chunk in range(self.chunks_written)}
        return dict(self._committed)

    def refresh_commits(self) -> None:
        """Re-read which chunks are committed: the attribute counter (one writer, and stores written before
        markers existed) and the markers under ``commits/`` (several writers); a chunk is committed if
        either says so."""
        counted, written = int(self.attrs["chunks_written"]), int(self.attrs["tokens_written"])
        committed = {chunk: min(self.chunk_rows(chunk)[1], written) - chunk * self.chunk_tokens
                     for chunk in range(counted)}
        markers = self._list_markers()
        committed.update(markers)
        self._committed = committed
        self.markers = self.markers or bool(markers)

    def _list_markers(self) -> dict[int, int]:
        found = {}
        for name in list_side_files(self, COMMITS):  # listed afresh: markers other ranks wrote a moment ago
            match = _MARKER.match(name)
            if match:  # anything else (a *.partial temporary of a killed writer) is not a commit
                found[int(match[1])] = int(match[2])
        return found

    def use_markers(self) -> None:
        """Commit by per-chunk markers from now on (for several writers); the attributes stay untouched
        until :meth:`finalize`, which only the first rank runs."""
        self.markers = True

    @property
    def n_tokens(self) -> int:
        """Rows that readers may use: all of them when complete, the committed ones otherwise."""
        return self.tokens_written

    @property
    def n_chunks(self) -> int:
        """Chunks holding readable rows."""
        return math.ceil(self.n_tokens / self.chunk_tokens)

    @property
    def n_chunks_planned(self) -> int:
        return math.ceil(self.tokens_planned / self.chunk_tokens)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of a chunk, clipped to the rows planned."""
        start = chunk * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.tokens_planned)

    def readable_rows(self, chunk: int) -> tuple[int, int]:
        """Row range of a chunk that readers may use: :meth:`chunk_rows` clipped to ``n_tokens``."""
        start, stop = self.chunk_rows(chunk)
        return start, min(stop, self.n_tokens)

    # ---------------------------------------------------------------- writing
    def write_chunk(self, chunk: int, layers: list[np.ndarray], tokens: np.ndarray, stats: ChunkStats) -> None:
        """Write one chunk of every layer, its tokens and statistics, then commit it (sequentially)."""
        stop, jobs = self._chunk_jobs(chunk, layers, tokens, stats)
        try:
            for job in jobs:  # on this thread (zarr's loop where the caller runs an event loop: see chunk_io._own_loop)
                chunk_io.put(*job)
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        self.finish_chunk(PendingChunk(chunk, stop, [], stats))

    def start_chunk(self, chunk: int, layers: list[np.ndarray], tokens: np.ndarray, stats: ChunkStats,
                    executor: Executor, encoder: ChunkProcesses | None = None,
                    failure: FirstFailure | None = None) -> PendingChunk:
        """Start writing one chunk: every layer's chunk, the tokens and the statistics, as separate jobs
        on ``executor``, each run whole on its worker thread (see :func:`chunk_io.put`): encoding releases the
        GIL, so layers compress in parallel.  With ``encoder``, the writes of whole local chunk files in its
        shared memory (the layers' chunks) go to its processes instead (the same bytes; see
        :mod:`stores.chunk_files`), the others (the tokens and statistics) to ``executor``.  With ``failure``
        (one per writer), no write is begun once one has failed (:class:`FirstFailure`).  Nothing is committed
        until :meth:`finish_chunk`."""
        stop, jobs = self._chunk_jobs(chunk, layers, tokens, stats)
        failure = failure or FirstFailure()  # (one of this chunk's own)
        futures = []
        for array, unchecked, key, values in jobs:  # the processes take the chunks in their shared memory
            direct = (chunk_io.direct_chunk_file(array, key, values)
                      if encoder is not None and encoder.shared.locate(values) is not None else None)
            futures.append(failure.handed(functools.partial(encoder.write, *direct, values)) if direct is not None
                           else executor.submit(failure.run, chunk_io.put, array, unchecked, key, values))
        return PendingChunk(chunk, stop, futures, stats)

    def _chunk_jobs(self, chunk: int, layers: list[np.ndarray], tokens: np.ndarray,
                    stats: ChunkStats) -> tuple[int, list[tuple[zarr.Array, zarr.Array, Any, np.ndarray]]]:
        """The ``chunk_io.put`` arguments (array, the same with empty chunks written, key, values) of one chunk's
        writes, and the row after its last.

        With the attribute counter chunks are started in order: ``chunk`` must be the next one not yet
        started; with markers in any order.  Never a chunk already committed.  A chunk holds its planned
        rows, except a last, short one when the source ran out (then :meth:`finalize`)."""
        if not self.markers and chunk != self._next_to_start:
            raise RuntimeError(f"chunk {chunk} written out of order (next is {self._next_to_start})")
        if chunk in self._committed:
            raise RuntimeError(f"chunk {chunk} is already committed")
        start, planned_stop = self.chunk_rows(chunk)
        n = len(tokens)
        if not 0 < n <= planned_stop - start or any(a.shape != (n, self.d_model) for a in layers):
            raise ValueError(f"chunk {chunk} takes 1 to {planned_stop - start} rows of width {self.d_model}")
        rows = slice(start, start + n)
        writes = [(array, rows, values) for array, values in zip(self._layers, layers)]
        writes += [(self._tokens, rows, tokens), (self._chunk_stats["chunk_sum"], chunk, stats.sums),
                   (self._chunk_stats["chunk_norm_sum"], chunk, stats.norm_sums),
                   (self._chunk_stats["chunk_overflow"], chunk, stats.overflow)]
        if self._unchecked is None:  # opened once, like the arrays: with_config builds a codec pipeline
            with quiet_numcodecs():
                self._unchecked = {array.path: array.with_config({"write_empty_chunks": True}) for array, _, _ in writes}
        self._next_to_start = chunk + 1
        return start + n, [(array, self._unchecked[array.path], key, values) for array, key, values in writes]

    def finish_chunk(self, pending: PendingChunk) -> None:
        """Wait for a started chunk's writes, then commit it: write its marker (several writers) or
        advance ``chunks_written`` (one writer)."""
        self.finish_chunks([pending])

    def finish_chunks(self, pendings: list[PendingChunk]) -> None:
        """Wait for started chunks' writes, in order, then commit them: a marker each (several writers),
        or ``chunks_written`` advanced past the last in one metadata write (one writer; a write through zarr
        cost about 1.7 ms a chunk on the model's thread here).  Where a chunk's write failed, the chunks
        before it are committed, then its error is raised."""
        done: list[PendingChunk] = []
        failure: BaseException | None = None
        for pending in pendings:
            if not self.markers and pending.chunk != self.chunks_written + len(done):
                failure = RuntimeError(f"chunk {pending.chunk} committed out of order "
                                       f"(next is {self.chunks_written + len(done)})")
                break
            try:
                for future in pending.futures:
                    future.result()
            except BaseException as exc:
                failure = exc
                break
            done.append(pending)
        try:
            if done and self.markers:
                for pending in done:
                    self._write_marker(pending.chunk, pending.stop - pending.chunk * self.chunk_tokens)
            elif done:
                self._set_attrs(chunks_written=done[-1].chunk + 1, tokens_written=done[-1].stop)
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        for pending in done:
            self._committed[pending.chunk] = pending.stop - pending.chunk * self.chunk_tokens
            self._add_to_totals(pending)
        if isinstance(failure, OSError):
            raise _write_error(self.path, failure) from None
        if failure is not None:
            raise failure

    def _add_to_totals(self, pending: PendingChunk) -> None:
        """Add a committed chunk's statistics to the running totals, where it is the next chunk of an
        unbroken run from chunk 0 (otherwise, a resume or another writer's chunks: finalize reads them)."""
        if pending.chunk == 0 and pending.stats is not None:
            self._totals = (0, [np.zeros(self._chunk_stats[name].shape[1:], dtype=self._chunk_stats[name].dtype)
                                for name in CHUNK_STATS])
        if self._totals is None or self._totals[0] != pending.chunk or pending.stats is None:
            self._totals = None
            return
        count, totals = self._totals
        for total, values in zip(totals, (pending.stats.sums, pending.stats.norm_sums, pending.stats.overflow)):
            total += np.asarray(values, dtype=total.dtype)  # as stored, then added as _sum_chunk_stats does
        self._totals = (count + 1, totals)

    def _write_marker(self, chunk: int, rows: int) -> None:
        """One small object per chunk, written whole through the group's zarr store: a temporary file
        renamed into place on local disks (LocalStore), a single PUT on object storage (FsspecStore).
        No writer ever rewrites a file another one writes, so nothing is lost between ranks (the
        attributes, one ``zarr.json`` rewritten whole from each process's copy, would lose commits)."""
        body = json.dumps({"chunk": chunk, "rows": rows}).encode()
        prefix = f"{self.group.path}/" if self.group.path else ""
        key = f"{prefix}{COMMITS}/{chunk}_{rows}.json"
        sync(self.group.store.set(key, default_buffer_prototype().buffer.from_bytes(body)))

    def remove_markers(self) -> None:
        """Delete the commit markers of a complete store (they only record progress while it is written,
        and a store written by several writers then has the same files as one written by one)."""
        remove_side_files(self, COMMITS)

    def finalize(self, extra_attributes: dict[str, Any] | None = None, *, exhausted: bool = False) -> None:
        """Write the exact mean and mean norm, shrink to the rows written, and mark complete.

        Run by one process (the first rank) after every writer has finished.  The store is the committed
        prefix: it must be every planned row, or end where the source ran out (a short last chunk, or
        ``exhausted`` when it ran out at a chunk boundary); committed chunks past it are an error."""
        if self.markers:
            self.refresh_commits()  # the other ranks' markers
        n_chunks, n = self._prefix()
        short = n_chunks > 0 and n < self.chunk_rows(n_chunks - 1)[1]
        if any(chunk >= n_chunks for chunk in self._committed):
            if short:
                raise StoreError(f"cache {self.path} has chunks committed past row {n:,}, where the source ran "
                                 "out; choose another --cache")
            raise StoreError(f"cache {self.path}: chunk {n_chunks} was not written; re-run the same command to resume")
        if n == 0:
            raise StoreError(f"cache {self.path} has no rows to finalize")
        if n < self.tokens_planned and not (short or exhausted):
            raise StoreError(f"cache {self.path}: chunk {n_chunks} was not written; re-run the same command to resume")
        try:
            if n < self.tokens_planned:  # the corpus ran out: shrink every array to what was written
                self._unchecked = None  # its handles hold the old shape
                # Nothing was written past row n, so there is nothing to delete: zarr's deleting resize
                # lists every chunk of the old shape (a --tokens of 10^13 took 11 GB of memory for it)
                shapes = [(array, (n, *array.shape[1:])) for array in [*self._layers, self._tokens]]
                shapes += [(array, (n_chunks, *array.shape[1:])) for array in self._chunk_stats.values()]
                for array, shape in shapes:
                    sync(array.async_array.resize(shape, delete_outside_chunks=False))
            if self._totals is not None and self._totals[0] == n_chunks:
                sums, norm_sums, overflow = self._totals[1]
            else:
                sums, norm_sums, overflow = (self._sum_chunk_stats(name, n_chunks) for name in CHUNK_STATS)
            stats = self.group["stats"]
            stats.create_array("mean", shape=sums.shape, dtype="float32", compressors=small_array_codecs(),
                               overwrite=True)[:] = (sums / n).astype(np.float32)
            stats.create_array("norm", shape=norm_sums.shape, dtype="float32", compressors=small_array_codecs(),
                               overwrite=True)[:] = (norm_sums / n).astype(np.float32)
            # the committed prefix becomes the counter (several writers never advanced it), with the rest
            # in one metadata write: the same zarr.json whatever wrote the chunks
            self._set_attrs(**(extra_attributes or {}), chunks_written=n_chunks, tokens_written=n,
                            overflow_values=overflow.tolist())
            self._set_attrs(complete=True)  # last, so nothing incomplete ever looks complete
            if self.markers:
                self.remove_markers()
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def _set_attrs(self, **values: Any) -> None:
        # one metadata write for all keys (``group.attrs.update`` would write zarr.json once per key,
        # and a kill between those writes would leave the commit half-recorded)
        self.group.update_attributes(values)
        self.attrs.update(values)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind (local stores only)."""
        if not is_local(self.path):
            return 0
        stale = list(_local_path(self.path).rglob("*.partial"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # ---------------------------------------------------------------- reading
    def layer_array(self, layer: int) -> zarr.Array:
        """The Zarr array of one layer (for lazy readers such as ``dask.array.from_zarr``)."""
        return self._layers[layer]

    def read_rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one layer as stored (bfloat16 comes back as uint16 bits).

        A chunk that fails its checksum or does not decode, and a chunk that is missing (zarr would
        hand back zeros), raise :class:`StoreError` naming the cache, the layer and the rows."""
        array = self._layers[layer]
        rows = range(*slice(start, stop).indices(array.shape[0]))
        # into a buffer of our own, so that a whole local chunk takes the direct path of chunk_io.get (about
        # twice zarr's speed here); zarr fills it for any other range
        values = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
        if len(rows):  # (empty, or wholly past the end: nothing to read)
            self.read_into(layer, rows.start, rows.start + len(rows), values)
        return values

    def iter_rows(self, layer: int, start: int, stop: int, batch_rows: int, pool: Executor | None = None,
                  ahead: int = 0) -> Iterator[np.ndarray]:
        """Rows ``[start, stop)`` of one layer as :meth:`read_rows` gives them, ``batch_rows`` at a time, in
        order; with ``pool``, up to ``ahead`` further batches are decoded on its threads meanwhile."""
        stop = min(stop, self.n_tokens)
        jobs = ((layer, begin, min(stop, begin + batch_rows)) for begin in range(start, stop, batch_rows))
        yield from _in_order(pool, self.read_rows, jobs, ahead)

    def read_into(self, layer: int, start: int, stop: int, out: np.ndarray,
                  processes: ChunkProcesses | None = None) -> None:
        """:meth:`read_rows` decoded by zarr straight into ``out`` ((stop − start, d_model), the stored
        array dtype): no allocation and copy per chunk.  The same errors.  With ``processes``, each whole
        chunk file whose rows in ``out`` lie in their shared memory is decoded by one of them (the calling
        thread waits, without the GIL)."""
        array = self._layers[layer]
        # a local range is read chunk by chunk, so that every whole chunk in it takes chunk_io.get's direct path
        # (held-out evaluation reads 4,096 rows at a time, which rarely fall on chunk boundaries);
        # elsewhere one call, so that zarr fetches the chunks concurrently
        size = self.chunk_tokens
        inner = range((start // size + 1) * size, stop, size) if isinstance(array.store, LocalStore) else ()
        bounds = [start, *inner, stop]
        with self._decoding(layer, start, stop):
            for begin, end in zip(bounds, bounds[1:]):
                part = out[begin - start : end - start]
                if processes is None or not chunk_io.read_in_process(array, slice(begin, end), part, processes):
                    chunk_io.get(array, slice(begin, end), part)
        self._check_chunks_present(layer, start, stop, out)

    def read_selected(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """The given rows of one layer, in the given order (as stored): :meth:`read_rows`' errors."""
        with self._decoding(layer, int(rows.min()), int(rows.max()) + 1):
            values = self._layers[layer].get_orthogonal_selection((rows, slice(None)))
        for i in np.flatnonzero(~values.any(axis=1)):  # a zero row may come from a missing chunk
            self._check_chunks_present(layer, int(rows[i]), int(rows[i]) + 1, values[i : i + 1])
        return values

    def _check_chunks_present(self, layer: int, start: int, stop: int, values: np.ndarray) -> None:
        """zarr reads a missing chunk as its fill value (0; zarr-python issue #486). An activation row is
        almost never all zeros, so only a chunk whose first row read is all zeros is looked up in the
        store; an absent chunk is damage when its recorded statistics say it held non-zero values (an
        all-zero chunk is legitimately absent: zarr does not store chunks equal to the fill value)."""
        array = self._layers[layer]
        for chunk in range(start // self.chunk_tokens, -(-stop // self.chunk_tokens)):
            first = max(start, chunk * self.chunk_tokens)
            if values[first - start].any():
                continue
            missing = not sync(array.store.exists(_chunk_key(array, chunk)))
            if missing and self._read_stats("chunk_norm_sum", (chunk, layer)) != 0:  # (NaN held values too)
                chunk_stop = min(stop, (chunk + 1) * self.chunk_tokens)
                raise self._read_error(layer, first, chunk_stop, "chunk missing")

    @contextlib.contextmanager
    def _decoding(self, layer: int, start: int, stop: int) -> Iterator[None]:
        """A read of rows [start, stop) of ``layer``: a chunk that fails its checksum or decompression, or a
        failed disk read, becomes one :class:`StoreError` naming them."""
        try:
            yield
        except ProcessStopped as exc:  # the decoding process, not the cache: nothing for `gsae verify` to find
            raise StoreError(f"layer {layer} rows {start:,}–{stop - 1:,} of cache {self.path} were not decoded: "
                             f"{exc.strerror}; pass --reader threads to decode without processes") from None
        except Exception as exc:
            raise self._read_error(layer, start, stop, _describe_decode_error(exc)) from None

    def _read_error(self, layer: int, start: int, stop: int, problem: str) -> StoreError:
        return StoreError(f"cache {self.path}: layer {layer} rows {start:,}–{stop - 1:,} cannot be read ({problem}); "
                          f"run `gsae verify --cache {self.path}` to list every damaged chunk")

    def read_chunk(self, layer: int, chunk: int) -> np.ndarray:
        return self.read_rows(layer, *self.readable_rows(chunk))

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_tokens if stop is None else stop
        rows = range(*slice(start, stop).indices(self._tokens.shape[0]))
        try:
            values = self._tokens[start:stop]
        except Exception as exc:  # a chunk that fails its checksum or decompression
            raise self._tokens_error(rows, _describe_decode_error(exc)) from None
        self._check_token_chunks_present(rows, values)
        return values

    def _check_token_chunks_present(self, rows: range, values: np.ndarray) -> None:
        """zarr reads a missing chunk as zeros (its fill value): the model would then run on windows of token 0
        and eval write their metrics as if nothing were wrong.  A chunk whose rows read are all 0 is looked up;
        absent, it is damage (a chunk of token 0 alone, which text never gives, would be absent too: zarr stores
        no chunk equal to the fill value)."""
        if rows.step != 1:
            return
        size = self.chunk_tokens
        for chunk in range(rows.start // size, -(-rows.stop // size)):
            first, last = max(rows.start, chunk * size), min(rows.stop, (chunk + 1) * size)
            if values[first - rows.start : last - rows.start].any():
                continue
            if not sync(self._tokens.store.exists(_chunk_key(self._tokens, chunk))):
                raise self._tokens_error(range(first, last), "chunk missing")

    def _tokens_error(self, rows: range, problem: str) -> StoreError:
        span = f"rows {rows.start:,}–{rows.stop - 1:,}" if len(rows) else "rows"
        return StoreError(f"cache {self.path}: tokens {span} cannot be read ({problem}); "
                          f"run `gsae verify --cache {self.path}` to list every damaged chunk")

    @property
    def mean(self) -> np.ndarray:
        """Exact per-layer mean of the stored rows, float32 (n_layers, d_model).

        A complete store keeps it in ``stats/mean``; for an incomplete one (``allow_partial``) it is formed
        from the committed prefix's chunk statistics, as :meth:`finalize` will form it."""
        if self.complete:
            return self._read_stats("mean")
        return (self._sum_chunk_stats("chunk_sum", self._partial_chunks()) / self.n_tokens).astype(np.float32)

    @property
    def norm(self) -> np.ndarray:
        """Mean L2 norm of the stored rows per layer, float32 (n_layers,); as :attr:`mean` for an
        incomplete store."""
        if self.complete:
            return self._read_stats("norm")
        return (self._sum_chunk_stats("chunk_norm_sum", self._partial_chunks()) / self.n_tokens).astype(np.float32)

    def leading_stats(self, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, mean L2 norm), float32, of the rows of chunks 0..n_chunks-1 per layer: a training split's,
        without the held-out chunks after it.

        The larger part is never read chunk by chunk: when the leading chunks outnumber the rest, they are
        the store's totals less the rest's chunk statistics (a held-out tail is a few per cent of a cache).
        A complete store's are kept (training plans with the norms, then starts each SAE at the mean)."""
        if not 0 < n_chunks <= self.n_chunks:
            raise ValueError(f"the leading {n_chunks} chunks of a cache of {self.n_chunks}")
        if n_chunks in self._leading:
            return self._leading[n_chunks]
        stats = self._leading_stats(n_chunks)
        if self.complete:
            self._leading[n_chunks] = stats
        return stats

    def _leading_stats(self, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
        if n_chunks == self.n_chunks:
            return self.mean, self.norm
        rows = self.chunk_rows(n_chunks - 1)[1]
        if self.complete and n_chunks > self.n_chunks - n_chunks:
            # float64 from the float32 totals: a relative error of ~1e-7, as the stored mean's own
            sums = self.mean.astype(np.float64) * self.n_tokens - self._sum_chunk_stats("chunk_sum", self.n_chunks,
                                                                                        n_chunks)
            norm_sums = (self.norm.astype(np.float64) * self.n_tokens
                         - self._sum_chunk_stats("chunk_norm_sum", self.n_chunks, n_chunks))
        else:
            sums = self._sum_chunk_stats("chunk_sum", n_chunks)
            norm_sums = self._sum_chunk_stats("chunk_norm_sum", n_chunks)
        return (sums / rows).astype(np.float32), (norm_sums / rows).astype(np.float32)

    def _partial_chunks(self) -> int:
        if self.n_tokens == 0:
            raise StoreError(f"cache {self.path} holds no committed rows yet; re-run its `gsae cache` command")
        return self.n_chunks

    def _stats_array(self, name: str) -> zarr.Array:
        return self._chunk_stats[name] if name in self._chunk_stats else self._open_array(f"stats/{name}")

    def _read_stats(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """``stats/<name>[selection]``; an array that is missing, fails its checksum or does not decode is
        a :class:`StoreError` naming it."""
        array = self._stats_array(name)
        try:
            return array[selection]
        except Exception as exc:
            raise StoreError(f"cache {self.path}: stats/{name} cannot be read ({_describe_stats_error(exc)}); "
                             f"run `gsae verify --cache {self.path}` to list the damage") from None

    def _sum_chunk_stats(self, name: str, n_chunks: int, first: int = 0) -> np.ndarray:
        """The sum of ``stats/<name>`` over chunks first..n_chunks-1, added chunk by chunk in order (so the
        totals are reproducible), read a block of chunks at a time."""
        array = self._stats_array(name)
        total = np.zeros(array.shape[1:], dtype=array.dtype)
        for begin in range(first, n_chunks, _STATS_BLOCK):
            block = self._read_stats(name, slice(begin, min(n_chunks, begin + _STATS_BLOCK)))
            for values in block:
                total += values
        return total

    def check_stats(self) -> list[str]:
        """Decode every array under ``stats/`` (the chunk statistics of the readable chunks; ``mean`` and
        ``norm`` of a complete store); one line per damaged one, naming it (none when all decode)."""
        problems = []
        for name in CHUNK_STATS:
            array = self._chunk_stats[name]
            for begin in range(0, self.n_chunks, _STATS_BLOCK):
                stop = min(self.n_chunks, begin + _STATS_BLOCK)
                try:
                    array[begin:stop]
                    continue
                except Exception:  # read again chunk by chunk, to name the damaged ones
                    pass
                for chunk in range(begin, stop):
                    try:
                        array[chunk]
                    except Exception as exc:
                        start, end = self.readable_rows(chunk)
                        problems.append(f"stats/{name} chunk {chunk} (rows {start:,}–{end - 1:,}): "
                                        f"{_describe_stats_error(exc)}")
        if self.complete:
            for name, shape in (("mean", (self.n_layers, self.d_model)), ("norm", (self.n_layers,))):
                try:
                    values = self.group[f"stats/{name}"][:]
                except Exception as exc:  # its metadata or its data
                    problems.append(f"stats/{name}: {_describe_stats_error(exc)}")
                    continue
                if values.shape != shape:
                    problems.append(f"stats/{name}: shape {values.shape}, expected {shape}")
        return problems

    # ---------------------------------------------------------------- inspection
    def nbytes_on_disk(self, prefix: str = "") -> int:
        """Bytes the store (or one of its sub-paths, e.g. ``layers``) takes on its file system."""
        if is_local(self.path):
            return _local_bytes(_local_path(self.path) / prefix)
        fs, root = fsspec.core.url_to_fs(self.path)
        target = f"{root.rstrip('/')}/{prefix}" if prefix else root
        return int(fs.du(target)) if fs.exists(target) else 0

    def disk_bytes(self) -> tuple[int, int]:
        """(:meth:`nbytes_on_disk`, :meth:`activation_bytes`): a complete local store's by one walk of its folder,
        where the two walked ``layers/`` twice (most of its files: 1.1-2.4 s a walk of 81,000 here)."""
        if not (is_local(self.path) and self.complete):
            return self.nbytes_on_disk(), self.activation_bytes()
        root = _local_path(self.path)
        layers = os.path.join(str(root), "layers", "")
        total = activations = 0
        for path, size in _local_files(root):
            total += size
            activations += size if path.startswith(layers) else 0
        return total, activations

    def activation_bytes(self) -> int:
        """Bytes the readable chunks of the activations take: of an incomplete cache, not the chunks a run
        killed before it committed them left behind (they would inflate its bytes per value)."""
        if self.complete:
            return self.nbytes_on_disk("layers")
        total = 0
        for array in self._layers:
            sizes = self._chunk_files(array)
            total += sum(sizes.get(_chunk_key(array, chunk), 0) for chunk in range(self.n_chunks))  # all-zero: no file
        return total

    def _chunk_files(self, array: zarr.Array) -> dict[str, int]:
        """The files under ``array``'s folder, by store key, with their sizes: one listing (a walk of a local
        folder, an object store's prefix listing), no chunk read.  zarr's own ``list_prefix`` is not used: what
        it yields differs between its stores and versions (zarr-python#3773)."""
        if is_local(self.path):
            root = str(_local_path(self.path))
            skip = len(os.path.join(root, ""))  # the paths below start with the root and its separator
            return {path[skip:].replace(os.sep, "/"): size
                    for path, size in _local_files(os.path.join(root, array.path), follow_symlinks=True)}
        fs, root = fsspec.core.url_to_fs(self.path)
        root = root.rstrip("/")
        folder = f"{root}/{array.path}"
        listed = fs.find(folder, detail=True) if fs.exists(folder) else {}
        return {path[len(root) + 1:]: int(info.get("size") or 0) for path, info in listed.items()}

    def missing_chunks(self, tokens: bool = True) -> list[tuple[int, int, int]]:
        """The readable chunks whose file is gone, as ``(layer, first row, last row + 1)`` (layer -1: the
        tokens), found by one listing per array (:meth:`_chunk_files`), without reading a chunk.  A layer's
        chunk may be absent when it is all zeros (zarr stores no chunk equal to its fill value): it is missing
        only where its statistics say it held values.  A tokens chunk is never all zeros (token 0 alone), and is
        looked for only with ``tokens``.  A local listing took 1.1–2.4 s for 81,000 chunk files here (a 10M-token
        cache of SmolLM2-135M's 30 layers), against hours of training on them."""
        missing, norms = [], None
        for layer, array in [*enumerate(self._layers), *([(-1, self._tokens)] if tokens else [])]:
            present = self._chunk_files(array)
            for chunk in range(self.n_chunks):
                if _chunk_key(array, chunk) in present:
                    continue
                if layer >= 0 and norms is None:  # read once: a layer's folder gone took a read per chunk
                    norms = self._read_stats("chunk_norm_sum", slice(0, self.n_chunks))
                if layer < 0 or norms[chunk, layer] != 0:  # != : a chunk that held NaN held values too
                    missing.append((layer, *self.readable_rows(chunk)))
        return missing

    def check_chunks_present(self, tokens: bool = True) -> None:
        """Raise a :class:`StoreError` naming the first of :meth:`missing_chunks`, if any: before a long run
        starts, rather than when its stream reaches the chunk (a copy of a cache that left files behind)."""
        missing = self.missing_chunks(tokens)
        if missing:
            layer, start, stop = missing[0]
            more = len(missing) - 1
            problem = "chunk missing" + (f"; {more} more chunk{'s' if more > 1 else ''} missing too" if more else "")
            raise self._read_error(layer, start, stop, problem) if layer >= 0 else \
                self._tokens_error(range(start, stop), problem)

    def raw_activation_bytes(self) -> int:
        """Bytes the written activations would take uncompressed in the storage dtype."""
        return self.n_tokens * self.n_layers * self.d_model * STORAGE_DTYPES[self.dtype][1]

    def iter_chunk_checks(self) -> Iterator[tuple[str, int, int, int, str | None]]:
        """Decode every written chunk; yield ``(array, layer, start, stop, problem or None)``.

        Then decode the arrays under ``stats/`` (:meth:`check_stats`): a damaged one raises a
        :class:`StoreError` naming it (and counting the chunk problems yielded before), since the
        statistics have no rows to report them by."""
        arrays = [(f"layers/{layer}", layer, array) for layer, array in enumerate(self._layers)]
        arrays.append(("tokens", -1, self._tokens))
        damaged: list[str] = []
        for check in self._iter_array_checks(arrays):
            name, layer, start, stop, problem = check
            if problem:
                damaged.append(f"{'layer ' + str(layer) if layer >= 0 else name} rows {start:,}–{stop - 1:,}: {problem}")
            yield check
        stats = self.check_stats()
        if stats:
            also = (f"; also {len(damaged)} damaged chunk{'s' if len(damaged) > 1 else ''} (first: {damaged[0]})"
                    if damaged else "")
            more = f" and {len(stats) - 1} more" if len(stats) > 1 else ""
            raise StoreError(f"cache {self.path}: its statistics are damaged: {stats[0]}{more}{also}; restore the "
                             "cache from a copy or re-create it with `gsae cache`")

    def _iter_array_checks(self, arrays: list[tuple[str, int, zarr.Array]]) -> Iterator[tuple[str, int, int, int, str | None]]:
        """:meth:`_check_chunk` of every chunk of ``arrays``, chunk by chunk, in order, on a thread per usable
        core (blosc and the checksum release the GIL; each thread decodes on its own event loop: chunk_io.get).
        The 620 chunks of a 20,000-token SmolLM2 cache, on this 2-core CPU: 1.04 s, against 1.73 s for zarr
        decoding them one at a time (`benchmarks/verify_speed.py`) and 3.3-3.9 s for this loop before."""
        jobs = ((chunk, name, layer, array) for chunk in range(self.n_chunks) for name, layer, array in arrays)
        threads = usable_cores()
        with ThreadPoolExecutor(threads, thread_name_prefix="gsae-verify") as pool:
            yield from _in_order(pool, self._check_chunk, jobs, ahead=2 * threads)

    def _check_chunk(self, chunk: int, name: str, layer: int, array: zarr.Array) -> tuple[str, int, int, int, str | None]:
        """``(name, layer, start, stop, problem or None)`` of one chunk of ``array``: decoded whole, its checksum
        checked; missing, empty, a folder in its place, or short of rows."""
        start, stop = self.readable_rows(chunk)
        key = _chunk_key(array, chunk)
        problem = None
        try:  # one request on an object store: its size says whether it exists too
            size = sync(array.store.getsize(key))
        except FileNotFoundError:  # what zarr's stores raise for a missing key
            size = None
        if size is None:  # an all-zero layer chunk has no file by right (missing_chunks)
            problem = None if layer >= 0 and self._held_nothing(chunk, layer) else "chunk missing"
        elif size == 0:  # zarr would call it a checksum mismatch
            problem = "chunk file is empty (0 bytes)"
        elif min(stop, array.shape[0]) - start != stop - start:
            problem = f"decoded {max(0, min(stop, array.shape[0]) - start)} rows, expected {stop - start}"
        else:
            try:
                values = chunk_io.get(array, slice(start, stop),
                                      np.empty((stop - start, *array.shape[1:]), dtype=array.dtype))
                if not values.any() and not sync(array.store.exists(key)):
                    # a size but no chunk (a folder in its place): zarr read it as the fill value
                    problem = "chunk missing (not a file)"
            except Exception as exc:  # a corrupt chunk fails its checksum or decompression
                problem = _describe_decode_error(exc)
        return name, layer, start, stop, problem

    def _held_nothing(self, chunk: int, layer: int) -> bool:
        """Whether the statistics say ``layer``'s chunk held only zeros (zarr stores no file for it); False
        where they cannot say (damaged: :meth:`check_stats` names them)."""
        try:
            return bool(self._read_stats("chunk_norm_sum", chunk)[layer] == 0)
        except StoreError:
            return False


_T = TypeVar("_T")


def _in_order(pool: Executor | None, function: Callable[..., _T], jobs: Iterable[tuple], ahead: int) -> Iterator[_T]:
    """``function(*job)`` for each of ``jobs``, in order; with ``pool``, up to ``ahead`` further jobs run on its
    threads meanwhile.  A consumer that stops early (or fails) leaves none queued behind it."""
    if pool is None or ahead < 1:
        for job in jobs:
            yield function(*job)
        return
    pending: collections.deque = collections.deque()
    try:
        for job in jobs:
            pending.append(pool.submit(function, *job))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _chunk_key(array: zarr.Array, chunk: int) -> str:
    """The store key of chunk ``chunk`` (along the rows; an array is one chunk wide) of ``array``."""
    return f"{array.path}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def _describe_stats_error(exc: Exception) -> str:
    """:func:`_describe_decode_error`, where a KeyError (zarr: no such array) means the array is missing."""
    return "missing" if isinstance(exc, KeyError) else _describe_decode_error(exc)


def _describe_decode_error(exc: Exception) -> str:
    text = first_line(exc)
    if "checksum" in text.lower():
        return "checksum mismatch"
    return f"cannot decode ({text[:120]})"


def to_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 is kept as raw uint16 bits, see STORAGE_DTYPES)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def _side_file(store: ActivationStore, relative: str) -> str:
    return join(store.path, relative)


def write_side_file(store: ActivationStore, relative: str, data: bytes) -> str:
    """Write a file next to the arrays (grouping results, pictures), whole (see ``write_whole``)."""
    target = _side_file(store, relative)
    fs, path = fsspec.core.url_to_fs(target)
    try:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_whole(target, data)
    except OSError as exc:
        raise _write_error(target, exc) from None
    return target


def read_side_file(store: ActivationStore, relative: str) -> bytes | None:
    """The bytes of a file next to the arrays, or None if it does not exist."""
    fs, path = fsspec.core.url_to_fs(_side_file(store, relative))
    fs.invalidate_cache(path)  # s3fs caches listings (and answers exists() from them)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return handle.read()


def list_side_files(store: ActivationStore, relative: str) -> list[str]:
    """Names of the files in a folder next to the arrays (none when it does not exist)."""
    fs, path = fsspec.core.url_to_fs(_side_file(store, relative))
    fs.invalidate_cache(path)  # s3fs caches listings: a marker written a moment ago must show
    if not fs.exists(path):
        return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def remove_side_files(store: ActivationStore, relative: str) -> None:
    """Remove a folder next to the arrays, and what it holds."""
    fs, path = fsspec.core.url_to_fs(_side_file(store, relative))
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


TIMING_FILE = "timing.json"
TIMING_PARTS = "timing"  # timing/<rank>.json: each rank's own seconds while several ranks write


def write_seconds_writing(store: ActivationStore, seconds: float, rank: int | None = None) -> None:
    """Record the seconds spent producing the activations (summed over resumed runs).

    Kept in a side file, not the attributes: wall-clock time differs between a resumed and an
    uninterrupted run, and the store itself must end byte-identical.  With several writers each rank
    records its own seconds in ``timing/<rank>.json`` (no two processes write one file), and
    :func:`fold_seconds_writing` sums them into ``timing.json`` when the store is finalized."""
    relative = TIMING_FILE if rank is None else f"{TIMING_PARTS}/{rank}.json"
    write_side_file(store, relative, json.dumps({"seconds_writing": round(seconds, 3)}).encode())


def _seconds_in(store: ActivationStore, relative: str) -> float | None:
    data = read_side_file(store, relative)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:  # not JSON (UnicodeDecodeError is a ValueError too)
        record = None
    seconds = record.get("seconds_writing") if isinstance(record, dict) else None
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        problem = "not valid JSON" if record is None else "no seconds_writing number in it"
        raise StoreError(f"cache {store.path}: {relative} is damaged ({problem}); delete it and re-run (it only "
                         "records the seconds spent caching, for `gsae report`)")
    return float(seconds)


def read_seconds_writing(store: ActivationStore, rank: int | None = None) -> float | None:
    """The recorded seconds spent producing the activations (``timing.json`` plus any ranks' parts not
    yet folded in), or one rank's part; None for a cache that has none."""
    if rank is not None:
        return _seconds_in(store, f"{TIMING_PARTS}/{rank}.json")
    found = [_seconds_in(store, TIMING_FILE)]
    found += [_seconds_in(store, f"{TIMING_PARTS}/{name}") for name in list_side_files(store, TIMING_PARTS)
              if name.endswith(".json")]
    known = [seconds for seconds in found if seconds is not None]
    return round(sum(known), 3) if known else None


def fold_seconds_writing(store: ActivationStore) -> None:
    """Sum the ranks' parts into ``timing.json`` and delete them (nothing to do when there are none)."""
    if not list_side_files(store, TIMING_PARTS):
        return
    total = read_seconds_writing(store) or 0.0
    write_side_file(store, TIMING_FILE, json.dumps({"seconds_writing": round(total, 3)}).encode())
    remove_side_files(store, TIMING_PARTS)
