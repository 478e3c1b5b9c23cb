"""Logging a bug in code that holds message content: where it happened, not what it said.

``Logger.failure`` writes the exception's text with the traceback. In the paths that
hold a message (SMTP transform, IMAP FETCH rewriting, archive extraction) an exception
the code did not foresee -- a ``ValueError`` from a parser, a ``KeyError`` -- may quote
the header or body it choked on, and the log would then hold plaintext. :func:`log_bug`
logs at error level the exception's type and the frames it passed through (file, line,
function), which is what a bug report needs, and never its text or any local value.

Not for our own typed errors (:mod:`smimeproxy.errors`), whose text is written never to
hold message content and is logged as it is.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["log_bug", "where"]

MAX_FRAMES = 8


def where(error: BaseException | Failure) -> str:
    """The innermost frames of ``error``'s traceback, innermost first, as
    ``file.py:LINE:function`` joined by `` < `` (no source text, no values)."""
    if isinstance(error, Failure):
        frames = [(Path(f[1]).name, f[2], f[0]) for f in error.frames]
    else:
        frames = [
            (Path(f.filename).name, f.lineno, f.name)
            for f in traceback.extract_tb(error.__traceback__)
        ]
    inner = reversed(frames[-MAX_FRAMES:])
    return " < ".join(f"{file}:{line}:{name}" for file, line, name in inner)


def log_bug(
    log: Logger, event: str, error: BaseException | Failure | None = None, **fields: Any
) -> None:
    """Log ``event`` at error level with ``error=TypeName where=frames`` appended;
    ``error`` defaults to the exception being handled."""
    if error is None:
        error = sys.exc_info()[1]
    if error is None:
        log.error(event, **fields)
        return
    kind = error.type if isinstance(error, Failure) else type(error)
    log.error(
        event + " error={error} where={where}",
        error=getattr(kind, "__name__", str(kind)),
        where=where(error),
        **fields,
    )
