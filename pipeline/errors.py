"""The exception type the stages raise for problems the user can fix.

``cli.main`` turns it, and ``stores.StoreError`` (the store's own, which the stages let pass), into a
one-line message and exit code 1.
"""


class GsaeError(Exception):
    """A problem the user can fix (bad input, missing model, full disk); the message is one line."""
