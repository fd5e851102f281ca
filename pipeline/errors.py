"""The one exception type the command line turns into a one-line message."""


class GsaeError(Exception):
    """A problem the user can fix (bad input, missing model, full disk); the message is one line."""
