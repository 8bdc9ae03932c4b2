"""The one exception type a user sees as a one-line message instead of a traceback."""


class VlrlcdError(Exception):
    """A problem the user can act on: the message names the file, record or key and what to do."""
