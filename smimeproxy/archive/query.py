"""The archive query language, on top of whoosh's query parser.

Examples::

    from:carol subject:invoice date:[20260101 to 20260630] encrypted:yes
    body:"quarterly report" AND NOT folder:Trash
    attachment:contract.pdf verified:no
    date:[2026-01-01 to 2026-03-31] owner:alice@acme.test

Words without a field search subject, body, addresses and attachment names. Fields:
:data:`FIELDS`. Dates are ``YYYYMMDD`` or ``YYYY-MM-DD`` (also ``YYYY`` and ``YYYYMM``
for a whole year or month), ranges ``[A to B]`` inclusive, open ends ``[A to]`` /
``[to B]``. Booleans take ``yes``/``no`` (or ``true``/``false``).

Not guaranteed: whoosh's parser is lenient -- a malformed query may be read as plain
words rather than refused; only dates that cannot be read are refused
(:class:`~smimeproxy.archive.ArchiveError`), so a typo never silently matches nothing
for a date range.
"""

from __future__ import annotations

import re
from typing import Any

from whoosh import qparser
from whoosh.qparser.dateparse import DateParserPlugin
from whoosh.query import Every, Query

from smimeproxy.archive import ArchiveError

#: the fields a query may name (the index schema's searchable fields)
FIELDS: tuple[str, ...] = (
    "from",
    "to",
    "cc",
    "subject",
    "body",
    "date",
    "attachment",
    "folder",
    "owner",
    "signer",
    "messageid",
    "encrypted",
    "decrypted",
    "signed",
    "verified",
    "malformed",
    "smime",
    "uid",
)
#: searched by words without a field
DEFAULT_FIELDS: tuple[str, ...] = ("subject", "body", "from", "to", "cc", "attachment")
#: at most this many characters of query (a pasted document is not a query)
MAX_QUERY = 4096

_DATE_TERM = re.compile(r"date:(\[[^\]]*\]|\{[^}]*\}|\S+)", re.IGNORECASE)
_DASHED = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_DASHED_MONTH = re.compile(r"\b(\d{4})-(\d{2})\b")


def _normalise_dates(text: str) -> str:
    """``2026-01-31`` -> ``20260131`` inside ``date:`` terms (whoosh's English date
    parser reads the dashed form as a whole year)."""

    def fix(m: re.Match[str]) -> str:
        inner = _DASHED.sub(r"\1\2\3", m.group(1))
        inner = _DASHED_MONTH.sub(r"\1\2", inner)
        return "date:" + inner

    return _DATE_TERM.sub(fix, text)


def parser(schema: Any) -> tuple[qparser.QueryParser, list[str]]:
    """A whoosh parser for ``schema`` and the list it appends unreadable dates to."""
    errors: list[str] = []
    multi = qparser.MultifieldParser(list(DEFAULT_FIELDS), schema, group=qparser.AndGroup)
    multi.add_plugin(DateParserPlugin(free=False, callback=errors.append))
    return multi, errors


def parse(text: str, schema: Any) -> Query:
    """The whoosh query for ``text``; an empty query matches every message."""
    if len(text) > MAX_QUERY:
        raise ArchiveError(f"the query is longer than {MAX_QUERY} characters")
    text = text.strip()
    if not text or text == "*":
        return Every()
    p, errors = parser(schema)
    try:
        query = p.parse(_normalise_dates(text))
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ArchiveError(f"cannot read the query: {e}") from None
    if errors:
        raise ArchiveError(
            "cannot read the date in the query: "
            + ", ".join(repr(e) for e in errors)
            + " (use YYYYMMDD or YYYY-MM-DD, ranges as date:[A to B])"
        )
    return query
