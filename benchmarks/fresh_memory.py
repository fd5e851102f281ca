"""What fresh memory costs on this machine: first touch of memory never used before, against memory
the kernel hands out again, and a file written into memory that was never used against the same file
written again.

    python benchmarks/fresh_memory.py                  # 8 GiB of anonymous memory, a 2 GiB file in /dev/shm
    python benchmarks/fresh_memory.py --gib 12 --file-gib 4 --folder /tmp

Why: on the H200 machine (a Firecracker VM) a plain sequential write of raw bytes ran at 1.3–1.4 GB/s,
into the disk and into /dev/shm alike, and gsae's writer reached about the same with 16 threads while
keeping only ~3 cores busy. A VM whose guest memory is backed by the host only when first touched pays a
host fault per new page, whatever writes it (a page-cache page, a tmpfs page, a fresh buffer). If that
is the limit, the first pass here is slow and the second fast, GiB by GiB.

Prints, for anonymous memory: GB/s of the first touch of each GiB of one mapping, of touching the same
mapping again (no fault: memory bandwidth), and of a new mapping of the same size after the first is
unmapped (pages the kernel had freed); for the file: GB/s of the first write, and of the same bytes
written again after the file is deleted, and of the same bytes written with O_DIRECT, which bypasses
the page cache, from one buffer reused for every write.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

import numpy as np

GIB = 1 << 30


def touch(region: mmap.mmap, gib: int) -> list[float]:
    """Write every byte of ``region``, one GiB at a time; GB/s of each GiB."""
    rates = []
    for i in range(gib):
        view = np.frombuffer(region, dtype=np.uint8, count=GIB, offset=i * GIB)
        started = time.perf_counter()
        view.fill(1)
        rates.append(GIB / (time.perf_counter() - started) / 1e9)
        del view
    return rates


def write_file(path: str, gib: int, block: np.ndarray) -> float:
    """GB/s of writing ``gib`` GiB to ``path`` in ``block``-sized writes (no fsync: what the page cache
    takes), the file removed afterwards."""
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for _ in range(gib * GIB // block.nbytes):
            handle.write(block)
    rate = gib * GIB / (time.perf_counter() - started) / 1e9
    os.unlink(path)
    return rate


def write_direct(path: str, gib: int, block: mmap.mmap) -> float | str:
    """GB/s of the same bytes written with O_DIRECT (no page cache) from one reused page-aligned buffer,
    with an fsync at the end; a reason where the file system refuses O_DIRECT (tmpfs does)."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (OSError, AttributeError) as exc:
        return f"not possible here ({type(exc).__name__}: {exc})"
    try:
        started = time.perf_counter()
        for _ in range(gib * GIB // len(block)):
            os.write(handle, block)
        os.fsync(handle)
        return gib * GIB / (time.perf_counter() - started) / 1e9
    except OSError as exc:
        return f"not possible here ({type(exc).__name__}: {exc})"
    finally:
        os.close(handle)
        os.unlink(path)


def rates_text(rates: list[float]) -> str:
    return " ".join(f"{r:.2f}" for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=8, help="anonymous memory to touch, GiB")
    parser.add_argument("--file-gib", type=int, default=2, help="file size, GiB")
    parser.add_argument("--folder", default="/dev/shm", help="where the file is written")
    args = parser.parse_args()

    region = mmap.mmap(-1, args.gib * GIB)
    first = touch(region, args.gib)
    again = touch(region, args.gib)
    region.close()
    region = mmap.mmap(-1, args.gib * GIB)
    remapped = touch(region, args.gib)
    region.close()
    print(f"anonymous memory, GB/s per GiB: first touch {rates_text(first)}")
    print(f"anonymous memory, GB/s per GiB: the same pages again {rates_text(again)}")
    print(f"anonymous memory, GB/s per GiB: a new mapping after unmapping {rates_text(remapped)}")
    print(f"fresh ÷ touched-again = {np.median(first) / np.median(again):.2f}; "
          f"new mapping ÷ touched-again = {np.median(remapped) / np.median(again):.2f} (medians)")

    block = np.ones(64 << 20, dtype=np.uint8)
    path = os.path.join(args.folder, f"gsae-fresh-memory-{os.getpid()}.bin")
    once, twice = write_file(path, args.file_gib, block), write_file(path, args.file_gib, block)
    print(f"file of {args.file_gib} GiB in {args.folder}: first write {once:.2f} GB/s, again after deleting "
          f"it {twice:.2f} GB/s; first ÷ again = {once / twice:.2f}")
    aligned = mmap.mmap(-1, block.nbytes)  # page-aligned, as O_DIRECT needs
    np.frombuffer(aligned, dtype=np.uint8)[:] = 1
    direct = write_direct(path, args.file_gib, aligned)
    print(f"file of {args.file_gib} GiB in {args.folder} with O_DIRECT (no page cache), one reused buffer, fsync: "
          + (f"{direct:.2f} GB/s; ÷ the first buffered write = {direct / once:.2f}" if isinstance(direct, float) else direct))


if __name__ == "__main__":
    main()
