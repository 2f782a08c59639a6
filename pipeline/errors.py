"""What the user sees when something goes wrong, and what they must never see.

`UserError` means "the user asked for something wrong (or the machine cannot do
it)": the CLI prints it as one line and exits 2. `CheckFailed` is a check that
came out negative: one line, exit 1. Anything else is a bug and keeps its
traceback. Every line the pipeline shows or logs passes through `redact`, so a
password in a database URL never reaches a terminal, a log or MLflow.
"""

from __future__ import annotations

import re

# scheme://user:password@host  and  ?password=...  (SQLAlchemy and libpq spell it both ways). The password is
# read as SQLAlchemy's URL parser reads it: everything up to the next "@" (a "/", ":" or space included; an "@"
# in a password must be percent-encoded, or the driver itself would read the rest as the host).
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@\n]*)@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token)=)(?P<secret>[^&\s'\"]+)", re.IGNORECASE)
MASK = "***"
MAX_LINE = 400  # a value in an error message is shown, not dumped (an alias bomb once made a 2.8 MB line)


def redact(text: str) -> str:
    """`text` with credentials in URLs replaced by ***."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", text)


def first_line(error: BaseException) -> str:
    """The head of an exception's message (libraries put tracebacks and hints below it), never empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def shorten(text: str, limit: int = 60) -> str:
    """A value as it fits in one line of an error message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(message: str) -> str:
    """What the CLI prints: redacted, one line, bounded."""
    return shorten(redact(" ".join(str(message).split())), MAX_LINE)


class UserError(Exception):
    """Bad input (params, paths, downloads, stores): reported as one line, exit code 2."""


class CheckFailed(Exception):
    """A check the user asked for came out negative (e.g. `reproduce` found different metrics): exit code 1."""
