"""The exception type the stages raise for problems the user can fix, and the one place an OSError of a
write becomes one.

``cli.main`` turns it, and ``stores.StoreError`` (the store's own, which the stages let pass), into a
one-line message and exit code 1.
"""


from __future__ import annotations

import contextlib
import errno
from typing import Iterator


class GsaeError(Exception):
    """A problem the user can fix (bad input, missing model, full disk); the message is one line."""


SEED_LIMIT = 2**32  # seeds are 0 .. 2^32 - 1: numpy refuses negative ones, torch ones from 2^63 on


def check_seed(seed: int) -> None:
    """A --seed every stage can use (numpy's generators and torch's)."""
    if not 0 <= seed < SEED_LIMIT:
        raise GsaeError(f"--seed must be from 0 to {SEED_LIMIT - 1} (got {seed})")


@contextlib.contextmanager
def write_errors(where: str) -> Iterator[None]:
    """An OSError while writing ``where`` (disk full, not a folder, no permission) as one line."""
    try:
        yield
    except OSError as exc:
        reason = "disk full: free some space and re-run the same command" if exc.errno == errno.ENOSPC \
            else (exc.strerror or str(exc))
        raise GsaeError(f"cannot write {where}: {reason}") from None
