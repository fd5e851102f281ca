"""One process at a time on a local folder: an exclusive flock on a lock file, which the system drops when the
process ends (kill -9 included), so a killed command never leaves a stale lock behind.  Where no lock can be
had (a folder others own, a read-only disk, a file system without flock: Lustre mounted ``noflock``, NFS without
lockd), the work goes on unlocked, as on object storage, which has no locks at all."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: nothing is locked
    fcntl = None

#: errors of open or flock that mean "no lock to be had here", not "someone holds it"
_NO_LOCKING = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL,
               errno.ENOENT, errno.ENOTDIR, errno.EISDIR}
# a reader's brief shared lock (held_by_another) must not turn a writer away: it tries a few times
_TRIES, _PAUSE = 5, 0.04


def _open(lock_file: str, create: bool, made: list[str] | None = None) -> int | None:
    """A read-only descriptor of ``lock_file`` (flock needs no write access), made if ``create``, with its folder
    where that is gone (the process that made the folder for its lock removes it again when it made nothing
    else there: one that opened the name before finds it gone, and comes here; the folders made are added to
    ``made``); None where there is none to be had."""
    if fcntl is None:
        return None
    for attempt in range(_TRIES):
        try:
            return os.open(lock_file, os.O_RDONLY | (os.O_CREAT if create else 0), 0o666)
        except OSError as exc:
            if not (create and exc.errno == errno.ENOENT and attempt + 1 < _TRIES):
                if exc.errno in _NO_LOCKING:
                    return None
                raise
        missing = missing_folders(os.path.dirname(lock_file) or ".")
        try:
            os.makedirs(os.path.dirname(lock_file) or ".", exist_ok=True)
        except OSError:  # a parent that is a file, a folder others own: no lock to be had here
            return None
        if made is not None:
            made += missing
    return None


def missing_folders(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist, deepest first (what ``os.makedirs`` would make)."""
    missing, folder = [], os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _flock(handle: int, operation: int) -> bool:
    """flock, without waiting: False where another process holds a conflicting lock."""
    try:
        fcntl.flock(handle, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        # ESTALE: on NFS, a file its holder removed (exclusive then finds the name gone, and opens it afresh)
        if exc.errno not in _NO_LOCKING and exc.errno != errno.ESTALE:
            raise
    return True  # locked, or no locking on this file system


def _names(handle: int, lock_file: str) -> bool:
    """Whether ``lock_file`` still names the file ``handle`` has open (a holder that removed it, or removed and
    made it anew, leaves a lock on a file no one else will open)."""
    try:
        return os.path.samestat(os.fstat(handle), os.stat(lock_file))
    except OSError:
        return False


@contextlib.contextmanager
def exclusive(lock_file: str, busy: Exception, remove: bool = False,
              made: list[str] | None = None) -> Iterator[None]:
    """Hold ``lock_file`` for the ``with`` block; raise ``busy`` where another process holds it.  ``remove``:
    delete the file when done (still holding it: a process that opened it meanwhile finds, once it has the lock,
    that the name is gone, and opens the name afresh).  ``made``: the folders made for the lock file are added
    to it (for the caller to remove, where it leaves nothing in them)."""
    handle, held = _open(lock_file, create=True, made=made), False
    try:
        refused = reopened = 0
        while handle is not None:  # None: no lock to be had here, unlocked
            if _flock(handle, fcntl.LOCK_EX):
                if _names(handle, lock_file):
                    held = True
                    break
                stale, handle = handle, None  # (closed once: a re-open that raises must not close the number again)
                os.close(stale)  # the holder removed it as this process waited: not a lock on the name
                reopened += 1  # not a refusal: the holder let go (on the last try it read "busy", helper-75)
                if reopened > 100 * _TRIES:  # the name made and removed again and again: someone holds it
                    raise busy
                handle = _open(lock_file, create=True, made=made)
                continue
            refused += 1
            if refused >= _TRIES:
                raise busy
            time.sleep(_PAUSE)
        yield
    finally:
        if held and remove and _names(handle, lock_file):
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        if handle is not None:
            os.close(handle)  # drops the lock


def held_by_another(lock_file: str) -> bool:
    """Whether another process holds ``lock_file`` now (a brief shared lock is taken and dropped to tell)."""
    handle = _open(lock_file, create=False)
    if handle is None:
        return False
    try:
        return not _flock(handle, fcntl.LOCK_SH)
    finally:
        os.close(handle)
