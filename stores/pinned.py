"""Pinning host memory at its exact size, so that copies between it and a GPU are asynchronous DMA:
cudaHostRegister on memory torch did not allocate (the shared-memory buffers of the chunk processes, and
page-aligned anonymous memory from :func:`pinned_empty`).  torch's own pinned allocator rounds each request
up to a power of two (pytorch#150517): a 24 MiB chunk buffer took 32 MiB, a 143 MiB window 256 MiB, and on
the H200 machine's VM pinning fresh memory ran at about 1.3 GB/s (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap

import numpy as np
import torch


class PinError(Exception):
    """cudaHostRegister refused a buffer."""


def pin(buffer: np.ndarray) -> int:
    """Page-lock ``buffer`` for the GPU; its address, for :func:`unpin`."""
    address = buffer.ctypes.data
    error = int(torch.cuda.cudart().cudaHostRegister(address, buffer.nbytes, 0))
    if error:
        _clear_cuda_error()
        raise PinError(f"cudaHostRegister of {buffer.nbytes:,} bytes failed (CUDA error {error})")
    return address


def pinned_empty(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """A new C-contiguous array in page-aligned anonymous memory, pinned at its exact size, and its address
    for :func:`unpin` (which must come before the array is dropped).  Raises :class:`PinError`."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    mapping = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)
    return array, pin(array)


def unpin(address: int) -> None:
    """Undo :func:`pin` (after every copy into or out of the buffer has finished).  A refusal is let be (the
    pages stay locked until the process ends), its error cleared for torch's next check."""
    if int(torch.cuda.cudart().cudaHostUnregister(address)):
        _clear_cuda_error()


def can_pin_shared_memory() -> bool:
    """Whether a page of shared memory can be pinned here (no CUDA, no /dev/shm, or a refusal: False)."""
    from stores.chunk_files import SharedBuffers

    shared = SharedBuffers()
    try:
        unpin(pin(shared.empty((4096,), np.dtype(np.uint8))))
        return True
    except Exception:  # no CUDA, no cudart binding in this torch, no /dev/shm, a refusal
        return False
    finally:
        shared.close()


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed call of ours: torch checks it after each kernel
    launch, and would raise ours there.  torch.cuda.cudart() has no cudaGetLastError: the runtime library
    this process loaded has (none found: nothing to do)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        for path in paths:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(path).cudaGetLastError()
