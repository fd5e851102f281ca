"""Pinning host memory at its exact size, so that copies between it and a GPU are asynchronous DMA:
cudaHostRegister on memory torch did not allocate (the shared-memory buffers of the chunk processes, and
page-aligned anonymous memory from :func:`pinned_empty`).  torch's own pinned allocator rounds each request
up to a power of two (pytorch#150517): a 24 MiB chunk buffer took 32 MiB, a 143 MiB window 256 MiB, and on
the H200 machine's VM pinning fresh memory ran at about 1.3 GB/s (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import weakref

import numpy as np
import torch


class PinError(Exception):
    """cudaHostRegister refused a buffer (or there was no memory to make one to pin)."""


# address -> the finalizer that unpins a buffer of pinned_empty dropped without unpin()
_UNPIN_AT_DROP: dict[int, weakref.finalize] = {}


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
    for :func:`unpin`, due once no copy uses it.  Raises :class:`PinError`."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    try:
        mapping = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:  # no memory for it (strict overcommit): the caller's fallback, not a traceback
        raise PinError(f"no memory for a buffer of {count * dtype.itemsize:,} bytes ({exc.strerror or exc})") from None
    root = np.frombuffer(mapping, dtype=dtype, count=count)
    address = pin(root)
    # A buffer dropped without unpin() (an error on the way, a stream never closed) is unpinned as its last
    # view goes, before its memory is unmapped: no registration is left at an address a later mmap reuses
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    finalizer = _UNPIN_AT_DROP[address] = weakref.finalize(root, _dropped, address, device)
    finalizer.atexit = False  # at exit the process's pages go anyway
    return root.reshape(shape), address


def unpin(address: int) -> None:
    """Undo :func:`pin` (after every copy into or out of the buffer has finished).  A refusal is let be (the
    pages stay locked until the process ends), its error cleared for torch's next check."""
    finalizer = _UNPIN_AT_DROP.pop(address, None)
    if finalizer is not None:
        finalizer.detach()
    _unregister(address)


def _dropped(address: int, device: int | None) -> None:
    """A buffer of pinned_empty is going without unpin(): unpin it now, on the device current where it was
    pinned (the last view may go in any thread, whose current device is 0: under torchrun the call would
    make a context on another rank's GPU)."""
    _UNPIN_AT_DROP.pop(address, None)
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        _unregister(address)


def _unregister(address: int) -> None:
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
