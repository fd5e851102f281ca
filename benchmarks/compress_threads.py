"""Does compressing a chunk scale across threads, and what holds it back?  Compress, checksum and write
4 MiB float16 chunks from N threads, with the store's codec (blosc zstd 1, byte shuffle, 256 KiB blocks,
then CRC32C), five ways, in one run:

    python benchmarks/compress_threads.py                           # 1, 2 and all threads, into /dev/shm
    python benchmarks/compress_threads.py --threads 1,2,4,8,16 --chunks 256 --folder /tmp

- ``numcodecs``: what gsae's writer did per chunk before 2026-11-28 (``stores.chunk_io.
  _encode_chunk_file``): numcodecs' ``Blosc.encode`` (blosc runs without the GIL, but numcodecs then copies
  the compressed bytes into a new bytes object, ``dest[:cbytes]``, with the GIL held, into memory that may
  be fresh), then google_crc32c (holds the GIL), then a file written and renamed into place;
- ``numcodecs+crc32c``: the same with the crc32c package's checksum, which releases the GIL: what gsae's
  writer does on a machine with more than 2 cores (``stores.chunk_files.chunk_checksum``);
- ``reused``: the same blosc function of the same library (``blosc_compress_ctx``, called through ctypes,
  which releases the GIL) into a buffer each thread reuses, with google_crc32c: no copy, no fresh memory;
- ``reused+crc32c``: the same with the crc32c package's checksum;
- ``raw``: the uncompressed bytes written the same way (what the file system gives N writers).

The codec object is the writer's (``stores.codecs``, typesize 2), and the bytes of ``reused`` are checked
equal to its output for every chunk.  Prints GB/s of float16 and the cores the process kept busy (CPU s ÷
wall s).  Measured on the H200 machine (2026-11-28, docs/benchmarks.md): with 16 threads ``numcodecs``
4.87 GB/s on 8.7 cores, ``reused`` 4.67 on 8.0, ``reused+crc32c`` 8.10 on 14.3: the GIL-held checksum,
not numcodecs' copy, stopped it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import google_crc32c
import numcodecs.blosc
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stores.codecs import activation_codecs  # noqa: E402

# the writer's own codec object: zarr's BloscCodec for float16 activations hands numcodecs typesize 2
CODEC = activation_codecs("lossless", "float16").compressors[0]._blosc_codec
try:  # blosc is linked into numcodecs' extension; this build exports its symbols, another may not
    _lib = ctypes.CDLL(numcodecs.blosc.__file__)
    _compress_ctx = _lib.blosc_compress_ctx
    _compress_ctx.restype = ctypes.c_int
    _compress_ctx.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _compress_ctx = None
_local = threading.local()
OVERHEAD = 16  # BLOSC_MAX_OVERHEAD


def encode_numcodecs(raw: np.ndarray) -> np.ndarray:
    return np.frombuffer(CODEC.encode(raw), dtype=np.uint8)


def encode_reused(raw: np.ndarray) -> np.ndarray:
    """CODEC's compression into this thread's buffer; the result is valid until this thread's next call."""
    need = raw.nbytes + OVERHEAD
    buffer = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < need:
        buffer = _local.buffer = np.empty(need, dtype=np.uint8)
    size = _compress_ctx(CODEC.clevel, CODEC.shuffle, CODEC._typesize, raw.nbytes, raw.ctypes.data,
                         buffer.ctypes.data, need, CODEC._cname_bytes, CODEC.blocksize, 1)
    if size <= 0:
        raise RuntimeError(f"blosc_compress_ctx returned {size}")
    return buffer[:size]


def write(folder: str, name: str, payload: np.ndarray, checksum: bytes) -> None:
    temporary = os.path.join(folder, f"{name}.partial")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.write(checksum)
    os.replace(temporary, os.path.join(folder, name))


def job(variant: str, folder: str, index: int, chunk: np.ndarray) -> None:
    raw = chunk.reshape(-1).view(np.uint8)
    if variant == "raw":
        payload = raw
    elif variant.startswith("numcodecs"):
        payload = encode_numcodecs(raw)
    else:
        payload = encode_reused(raw)
    if variant.endswith("+crc32c"):
        import crc32c

        checksum = crc32c.crc32c(payload, gil_release_mode=1)
    else:
        checksum = google_crc32c.value(payload)
    write(folder, f"c{index}", payload, np.uint32(checksum).tobytes())


def run(variant: str, threads: int, chunks: list[np.ndarray], folder: str) -> tuple[float, float]:
    """(GB/s of float16, cores busy) writing every chunk once from ``threads`` threads."""
    target = tempfile.mkdtemp(prefix=f"{variant}-", dir=folder)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(job, [variant] * threads, [target] * threads, range(threads), chunks[:threads]))  # warm-up
            cpu, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            list(pool.map(job, [variant] * len(chunks), [target] * len(chunks), range(len(chunks)), chunks))
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
        busy = (after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime) / wall
        return sum(c.nbytes for c in chunks) / wall / 1e9, busy
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,all", help="comma-separated thread counts; all = os.cpu_count()")
    parser.add_argument("--chunks", type=int, default=64, help="distinct 4 MiB chunks, each written once per run")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else ".")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (variant, threads); the best is kept")
    args = parser.parse_args()
    counts = list(dict.fromkeys(os.cpu_count() or 1 if t == "all" else int(t) for t in args.threads.split(",")))
    rng = np.random.default_rng(0)
    rows = 4 * 2**20 // (2 * args.d_model)
    chunks = [rng.standard_normal((rows, args.d_model), dtype=np.float32).astype(np.float16) for _ in range(args.chunks)]
    def same(chunk: np.ndarray) -> bool:  # in a pool thread, as the writer runs: on the main thread numcodecs
        raw = chunk.reshape(-1).view(np.uint8)  # uses blosc's global context, whose block split differs
        return np.array_equal(encode_reused(raw), encode_numcodecs(raw))

    variants = ["raw", "numcodecs"]
    if _compress_ctx is None:
        print("numcodecs' extension does not export blosc_compress_ctx here: the reused variants are left out")
    else:
        with ThreadPoolExecutor(1) as pool:  # the same bytes as the writer's: the comparison is of the same work
            assert all(pool.map(same, chunks)), "ctypes blosc differs from the writer's codec"
        variants.append("reused")
    try:
        import crc32c  # noqa: F401

        variants.insert(2, "numcodecs+crc32c")  # gsae's writer on more than 2 cores, since 2026-11-28
        variants += ["reused+crc32c"] if _compress_ctx is not None else []
    except ImportError:
        print("crc32c is not importable: the +crc32c variants are left out")
    print(f"{len(chunks)} chunks of {rows} × {args.d_model} float16 (Gaussian), into {args.folder}; "
          f"{os.cpu_count()} CPUs; codec {CODEC} typesize {CODEC._typesize} (the writer's)"
          + ("; bytes of ctypes blosc checked equal to it" if _compress_ctx is not None else ""))
    print(f"{'variant':<17}" + "".join(f"{f'{n} thr GB/s (cores)':>24}" for n in counts))
    for variant in variants:
        cells = []
        for n in counts:
            best = max((run(variant, n, chunks, args.folder) for _ in range(args.repeats)), key=lambda r: r[0])
            cells.append(f"{best[0]:8.2f} ({best[1]:4.1f})")
        print(f"{variant:<17}" + "".join(f"{cell:>24}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
