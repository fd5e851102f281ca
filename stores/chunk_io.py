"""One zarr array's chunks read and written whole on the calling thread (a writer's or a decoder's), and
a local array's whole chunk files encoded and decoded without zarr's per-chunk path, to zarr's bytes.

Why: zarr's sync API runs every read and write on its one event-loop thread, which capped the writer
and the stream's decode at about one core (docs/benchmarks.md, "write-only throughput").  Each function
says what it saves and where it hands over to zarr; tests/test_writers.py and tests/test_stream.py
compare the bytes and values with zarr's own path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.indexing import BasicIndexer
from zarr.storage import LocalStore, MemoryStore

from stores.chunk_files import ChunkProcesses, has_nonzero_byte, read_chunk_file, write_chunk_file


class _InlineExecutor(ThreadPoolExecutor):
    """An executor that runs each job at once on the submitting thread.

    It subclasses ThreadPoolExecutor only because ``loop.set_default_executor`` accepts nothing else;
    it never starts a thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a pool thread would
            future.set_exception(exc)
        return future


class _ThreadLoop:
    """One thread's own event loop (writers, decoders); closed when the thread ends and drops its locals."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(_InlineExecutor(max_workers=1))

    def __del__(self) -> None:
        self.loop.close()


_thread_loops = threading.local()


def _own_loop(array: zarr.Array) -> asyncio.AbstractEventLoop | None:
    """The calling thread's own event loop for ``array``'s I/O, or None where zarr's loop must do it:
    stores whose file systems are bound to zarr's loop (fsspec), and threads already running a loop
    (a notebook's main thread cannot run another one)."""
    if not isinstance(array.store, (LocalStore, MemoryStore)) or asyncio._get_running_loop() is not None:
        return None
    holder = getattr(_thread_loops, "holder", None)
    if holder is None:
        holder = _thread_loops.holder = _ThreadLoop()
    return holder.loop


@dataclass(frozen=True)
class ChunkLayout:
    """What :func:`whole_chunk_file` needs of an array, read from zarr once per array object: its metadata
    properties cost about 170 µs a chunk (py-spy, this machine), on the thread that runs the model when the
    writer's processes write, on the decode threads when the stream reads."""

    folder: Path  # the array's folder
    encode_key: Callable[[tuple[int, ...]], str]
    chunk_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    blosc: Any  # the numcodecs codec of a bytes → blosc → crc32c chain, else None
    codec: Any  # the same, or of a bytes → zstd → crc32c chain
    read_only: bool
    drops_empty_chunks: bool  # fill value 0 and write_empty_chunks off: an all-zero chunk has no file


_LAYOUTS: collections.OrderedDict[int, tuple[zarr.Array, Any, ChunkLayout | None]] = collections.OrderedDict()
_LAYOUTS_LOCK = threading.Lock()


def chunk_layout(array: zarr.Array) -> ChunkLayout | None:
    """The array's :class:`ChunkLayout` where gsae may read or write its chunk files itself (a local
    array chunked along its first axis only), else None; remembered for the last 256 arrays."""
    metadata = array.metadata
    with _LAYOUTS_LOCK:
        found = _LAYOUTS.get(id(array))
        if found is not None and found[0] is array and found[1] is metadata:
            _LAYOUTS.move_to_end(id(array))
            return found[2]
    layout = None
    if isinstance(array.store, LocalStore) and array.ndim >= 1:
        try:  # the files on disk: shards where the array has them (their codec is then zarr's: see chunk_codec)
            chunk_shape = tuple(array.shards or array.chunks)
        except NotImplementedError:  # a rectilinear grid (zarr 3.2+, opt-in): no one chunk shape, zarr reads it
            chunk_shape = ()
        if chunk_shape and chunk_shape[1:] == tuple(array.shape[1:]):
            layout = ChunkLayout(
                Path(array.store.root) / array.path, metadata.encode_chunk_key, chunk_shape, tuple(array.shape),
                array.dtype, chunk_codec(metadata.codecs), chunk_codec(metadata.codecs, zstd=True),
                array.store.read_only,
                not array.async_array.config.write_empty_chunks and not np.any(np.asarray(array.fill_value) != 0))
    with _LAYOUTS_LOCK:
        _LAYOUTS[id(array)] = (array, metadata, layout)
        while len(_LAYOUTS) > 256:
            _LAYOUTS.popitem(last=False)
    return layout


def whole_chunk_file(array: zarr.Array, rows: Any, shape: tuple[int, ...], dtype: np.dtype,
                      zstd: bool = False) -> Path | None:
    """The file of the one whole chunk that ``rows`` are, where gsae encodes and decodes it itself
    (:func:`_encode_chunk_file`, :func:`_decode_chunk_file`): a local array chunked along its first axis
    only (the activations' rows; the tokens; the per-chunk statistics, one chunk per index) whose codecs
    are exactly bytes (little-endian) → blosc → crc32c (what `gsae cache` writes losslessly), or with
    ``zstd`` (encoding only) bytes → zstd → crc32c (the tokens and statistics), and values of the chunk's
    ``shape`` and ``dtype``.  ``rows`` is a slice of whole rows, or an index where a chunk is one row.
    None where zarr must do it."""
    layout = chunk_layout(array)
    if layout is None or (layout.codec if zstd else layout.blosc) is None:
        return None
    chunk_rows, inner = layout.chunk_shape[0], layout.shape[1:]
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool) and chunk_rows == 1:
        start, stop, expected = int(rows), int(rows) + 1, inner
    elif isinstance(rows, slice) and rows.step in (None, 1) and rows.stop is not None:
        start, stop, expected = rows.start or 0, rows.stop, layout.chunk_shape
    else:
        return None
    if (start < 0 or start % chunk_rows or stop - start != chunk_rows or stop > layout.shape[0]
            or dtype != layout.dtype or tuple(shape) != expected):
        return None
    return layout.folder / layout.encode_key((start // chunk_rows,) + (0,) * len(inner))


def chunk_codec(codecs: tuple, zstd: bool = False) -> Any:
    """The numcodecs codec of a bytes (little-endian) → blosc → crc32c chain, or with ``zstd`` also of a
    bytes → zstd → crc32c one; None for any other chain."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

    if not (len(codecs) == 3 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[2], Crc32cCodec)
            and np.little_endian and getattr(codecs[0].endian, "value", codecs[0].endian) in (None, "little")):
        return None
    if isinstance(codecs[1], BloscCodec):
        return getattr(codecs[1], "_blosc_codec", None)
    if zstd and isinstance(codecs[1], ZstdCodec):
        return getattr(codecs[1], "_zstd_codec", None)
    return None


def indexing_grid(array: zarr.Array) -> Any:
    """The chunk grid zarr's indexers take: the array's runtime grid from zarr 3.2 on (where the metadata
    holds only a description: zarr 3.2+ needs Python 3.12+), its metadata's before."""
    grid = getattr(array.async_array, "_chunk_grid", None)
    return array.metadata.chunk_grid if grid is None else grid


def _decode_chunk_file(path: Path, out: np.ndarray) -> bool:
    """Decode one chunk file straight into ``out``, as zarr would: :func:`stores.chunk_files.read_chunk_file`.
    False if the file is absent (zarr then reads the fill value and the caller's missing-chunk check applies).

    Why not zarr: its per-chunk path (asyncio tasks, buffer wrappers, the compressed bytes and the decoded
    chunk each in a fresh allocation, the latter then copied into ``out``) took 5.2-6.1 ms per 4 MiB
    SmolLM2 chunk on one thread of this 2-core machine; this one takes 2.9 ms.  On the GPU machine 16
    threads decoded only 1.85M rows/s, slower than the SAE step they feed.  Checked equal to zarr's
    read, chunk by chunk and for every stored dtype, in tests/test_stream.py."""
    return read_chunk_file(str(path), out)


def read_in_process(array: zarr.Array, rows: slice, out: np.ndarray, processes: ChunkProcesses) -> bool:
    """Decode ``array[rows]``, one whole local chunk, into ``out`` in one of ``processes``; False where that
    is not possible (``out`` outside their shared memory, another codec) or the file is absent (zarr then
    reads the fill value)."""
    path = whole_chunk_file(array, rows, out.shape, out.dtype) if out.flags.c_contiguous else None
    if path is None or processes.shared.locate(out) is None:
        return False
    return processes.read(str(path), out).result()


def get(array: zarr.Array, rows: slice, out: np.ndarray | None = None) -> np.ndarray:
    """``array[rows]`` (into ``out`` when given), decoded on the calling thread: on its own event loop,
    as :func:`put` writes (zarr's one loop thread capped a thread-pool decode at ~70% of 2 cores);
    one whole local chunk by :func:`_decode_chunk_file`."""
    chunk_file = (whole_chunk_file(array, rows, out.shape, out.dtype)
                  if out is not None and out.flags.c_contiguous else None)
    if chunk_file is not None and _decode_chunk_file(chunk_file, out):
        return out
    buffer = default_buffer_prototype().nd_buffer.from_numpy_array(out) if out is not None else None
    loop = _own_loop(array)
    if loop is None:
        return array.get_basic_selection(rows, out=buffer)
    indexer = BasicIndexer(rows, array.shape, indexing_grid(array))
    return loop.run_until_complete(array.async_array._get_selection(
        indexer, out=buffer, prototype=default_buffer_prototype()))


def _encode_chunk_file(array: zarr.Array, key: Any, values: np.ndarray) -> bool:
    """Write ``values``, one whole chunk of a local bytes → blosc or zstd → crc32c array with a non-zero
    byte, as zarr writes it (its own codec object, the same checksum, a temporary file renamed into place), on
    the calling thread.  False where zarr must write it (a short chunk, other codecs or stores).

    Why not zarr: its write path hands blosc and the file write each to another thread
    (``asyncio.to_thread``) and runs its codec pipeline in Python around them.  Two writer threads on
    SmolLM2 chunks wrote 1.16-1.25 GB/s through it and 1.34-1.48 GB/s this way (this 2-core machine,
    alternating runs of benchmarks/cache_write.py).  The tokens and the per-chunk statistics (zstd) too:
    four small writes per chunk through zarr held the GIL for about a third of the writer threads' GIL
    time (py-spy --gil), and the 16 writer threads of the H200 machine kept only 4 cores busy.  The bytes
    are zarr's: tests/test_writers.py compares the two paths, and the S3 tests compare a local store
    (this path) with one written through zarr."""
    path = whole_chunk_file(array, key, np.shape(values), np.asarray(values).dtype, zstd=True)
    layout = chunk_layout(array) if path is not None else None
    if layout is None or layout.read_only:  # zarr refuses a read-only store
        return False
    write_chunk_file(str(path), layout.codec, values)
    return True


def direct_chunk_file(array: zarr.Array, key: Any, values: np.ndarray) -> tuple[str, Any] | None:
    """(file, numcodecs codec) of one whole chunk that gsae writes itself, all-zero values included:
    where :func:`_encode_chunk_file` writes it and an all-zero chunk's file is removed as
    :func:`_remove_empty_chunk_file` does (the arrays of `gsae cache`, local).  None where zarr is needed."""
    path = whole_chunk_file(array, key, values.shape, values.dtype, zstd=True)
    layout = chunk_layout(array) if path is not None else None
    if layout is None or layout.read_only or not layout.drops_empty_chunks:
        return None
    return str(path), layout.codec


def put(array: zarr.Array, unchecked: zarr.Array, key: Any, values: np.ndarray) -> None:
    """``array[key] = values``, run whole on the calling thread, on its own event loop, codecs included.

    Why not ``array[key] = values``: zarr's sync API runs every write on its one event-loop thread,
    which also runs the CRC32C codec and the empty-chunk test, and hands blosc to a second pool.
    Profiled (py-spy, 30 layers of SmolLM2 chunks, 2 cores) that thread was busy the whole time, and
    2 writer threads gave 1.3x of 1 on disk, 1.0x into /dev/shm with the empty-chunk test already
    skipped; with each writer thread running zarr's write path on its own loop, 1.7-1.9x.  Only for
    stores with no state tied to zarr's loop (local files, memory); fsspec stores keep zarr's loop.
    ``unchecked`` is ``array`` with ``write_empty_chunks`` on, see :func:`_write_target`."""
    target = _write_target(array, unchecked, values)
    if target is unchecked and _encode_chunk_file(array, key, values):
        return
    if target is array and _remove_empty_chunk_file(array, key, values):
        return
    loop = _own_loop(array)
    if loop is None:
        target[key] = values
        return
    loop.run_until_complete(target._async_array.setitem(key, values))


def _remove_empty_chunk_file(array: zarr.Array, key: Any, values: np.ndarray) -> bool:
    """What zarr does with a whole chunk of all-zero ``values`` (the fill value) when it does not write
    empty chunks: remove the chunk's file if there is one.  Done here for the arrays whose chunks
    :func:`_encode_chunk_file` writes (usually ``chunk_overflow``: its counts are nearly always 0), for
    the reason given there; False where zarr must do it."""
    direct = direct_chunk_file(array, key, np.asarray(values))  # None where zarr writes empty chunks, say
    if direct is None:
        return False
    path = Path(direct[0])
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def _write_target(array: zarr.Array, unchecked: zarr.Array, values: np.ndarray) -> zarr.Array:
    """``unchecked`` when ``values`` has a non-zero byte, else ``array``.

    Arrays are opened with zarr's default ``write_empty_chunks=False``: a chunk equal to the fill
    value (0) is not stored, and the stores written so far rely on that (all-zero ``chunk_overflow``
    chunks are absent).  zarr tests that by comparing ``.view("V2")`` elements, 2.7 ms per 4 MiB
    chunk with the GIL held, about what blosc takes to compress it; :func:`has_nonzero_byte` settles it
    for activations in 2 µs, so only all-zero values go through zarr's own test, and the bytes stay the
    same."""
    return unchecked if has_nonzero_byte(values) else array
