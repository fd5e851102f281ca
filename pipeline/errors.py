"""The exception type the stages raise for problems the user can fix.

``cli.main`` turns it, and ``stores.StoreError`` (the store's own, which the stages let pass), into a
one-line message and exit code 1.
"""


class GsaeError(Exception):
    """A problem the user can fix (bad input, missing model, full disk); the message is one line."""


SEED_LIMIT = 2**32  # seeds are 0 .. 2^32 - 1: numpy refuses negative ones, torch ones from 2^63 on


def check_seed(seed: int) -> None:
    """A --seed every stage can use (numpy's generators and torch's)."""
    if not 0 <= seed < SEED_LIMIT:
        raise GsaeError(f"--seed must be from 0 to {SEED_LIMIT - 1} (got {seed})")
