"""The one exception type for mistakes a user can fix."""


class EdgePruneError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line."""


class UnreachableTarget(EdgePruneError):
    """A latency target below what any pruned candidate measured (an accuracy-budget search steps back)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's error message (its type name when it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def user_message(exc: EdgePruneError) -> str:
    """The one line to print for `exc`. Raised in a DataLoader worker (`data.workers` > 0), it reaches the main
    process rebuilt by PyTorch with the worker's whole traceback as its message; its last line is the original."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]  # "edgeprune.errors.EdgePruneError: <message>"
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
