"""One process at a time on a local folder: an exclusive flock on a lock file, which the system drops when
the process ends (kill -9 included), so a killed command never leaves a stale lock behind."""

from __future__ import annotations

import contextlib
from typing import Iterator

from pipeline.errors import GsaeError, write_errors


@contextlib.contextmanager
def exclusive(lock_file: str, busy: str) -> Iterator[None]:
    """Hold ``lock_file`` (made if absent) for the ``with`` block; raise ``GsaeError(busy)`` at once where
    another process holds it.  Without fcntl (not POSIX) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with write_errors(lock_file):  # the lock file's own errors; not those of the work it guards
        handle = open(lock_file, "a+")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GsaeError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
