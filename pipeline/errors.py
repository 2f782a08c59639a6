"""The one exception type that means "the user asked for something wrong".

The CLI turns it into a single line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (params, paths, downloads): reported as one line, exit code 2."""


class CheckFailed(Exception):
    """A check the user asked for came out negative (e.g. `reproduce` found different metrics): exit code 1."""
