"""The one exception type for mistakes a user can fix."""


class EdgePruneError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line."""
