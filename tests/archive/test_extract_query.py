"""Field extraction and the query language, including hostile input (hypothesis)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.extract import extract, html_to_text
from smimeproxy.archive.index import IndexedMessage, WhooshIndex, schema
from smimeproxy.archive.query import parse
from tests.archive.conftest import plain


def test_fields_from_a_multipart_message() -> None:
    data = plain(
        "=?utf-8?q?R=C3=A9sum=C3=A9?= of Q1",
        "plain words",
        html="<html><head><title>t</title><style>p{}</style></head><p>caf&eacute; menu</p></html>",
        attachment=("minutes.txt", "attached words"),
        date="Tue, 03 Mar 2026 23:30:00 -0200",
        message_id="<m1@partner.test>",
    )
    f = extract(data)
    assert f.subject == "Résumé of Q1"
    assert f.date == datetime.datetime(2026, 3, 4, 1, 30)  # UTC
    assert f.message_id == "<m1@partner.test>"
    assert f.sender == "Carol <carol@partner.test>"
    assert "plain words" in f.body and "café menu" in f.body and "attached words" in f.body
    assert "p{}" not in f.body
    assert f.attachments == ("minutes.txt",)
    assert not (f.encrypted or f.signed or f.malformed)


def test_html_to_text_survives_broken_markup() -> None:
    assert html_to_text("<p>a<b>b</p><script>evil()</script>c &amp; d<") == "a b c & d <"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_extract_never_raises(data: bytes) -> None:
    extract(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_extract_of_damaged_mime_never_raises(tail: bytes) -> None:
    head = b'Subject: x\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
    extract(head + tail + b"\r\n--b--")


SCHEMA = schema()


def test_query_language() -> None:
    q = parse("from:carol subject:invoice date:[20260101 to 20260630] encrypted:yes", SCHEMA)
    text = repr(q)
    assert "Term('from', 'carol')" in text and "Term('subject', 'invoice')" in text
    assert "DateRange('date', datetime.datetime(2026, 1, 1, 0, 0)" in text
    assert "datetime.datetime(2026, 6, 30, 23, 59, 59" in text
    assert "Term('encrypted', True)" in text
    dashed = repr(parse("date:[2026-01-01 to 2026-06-30]", SCHEMA))
    assert "datetime.datetime(2026, 6, 30, 23, 59, 59" in dashed


@pytest.mark.parametrize("bad", ["date:[notadate to 2026]", "date:yesterdayish", "x" * 5000])
def test_unreadable_queries_are_refused(bad: str) -> None:
    with pytest.raises(ArchiveError):
        parse(bad, SCHEMA)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_query_parser_raises_only_archive_errors(text: str) -> None:
    try:
        parse(text, SCHEMA)
    except ArchiveError:
        pass


def test_search_by_date_range_and_flags(tmp_path: Path) -> None:
    index = WhooshIndex(tmp_path / "ix")
    dates = ["Mon, 05 Jan 2026 10:00:00 +0000", "Tue, 30 Jun 2026 22:00:00 +0000",
             "Wed, 01 Jul 2026 00:30:00 +0000"]  # fmt: skip
    with index.writer() as w:
        for n, date in enumerate(dates):
            f = extract(plain(f"invoice {n}", "body", date=date))
            w.add(IndexedMessage(f"id{n}", "mb", "alice@acme.test", "INBOX", str(n), "0" * 64,
                                 10, f))  # fmt: skip
    found = index.search("subject:invoice date:[20260101 to 20260630]")
    assert [h.subject for h in found] == ["invoice 0", "invoice 1"]
    assert index.search("date:[2026-07-01 to]")[0].subject == "invoice 2"
    assert len(index.search("encrypted:no owner:alice@acme.test")) == 3
    assert index.search("encrypted:yes") == []
    index.close()
