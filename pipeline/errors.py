"""The one exception type that means "the user asked for something wrong".

The CLI turns it into a single line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""


def first_line(error: BaseException) -> str:
    """The head of an exception's message (libraries put tracebacks and hints below it), never empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class UserError(Exception):
    """Bad input (params, paths, downloads): reported as one line, exit code 2."""


class CheckFailed(Exception):
    """A check the user asked for came out negative (e.g. `reproduce` found different metrics): exit code 1."""
