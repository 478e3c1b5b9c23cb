"""Internationalised domains as the gateway compares them (RFC 5890, IDNA 2008).

A domain may arrive as U-labels (``例子.测试``, with SMTPUTF8) or as A-labels
(``xn--fsqu00a.xn--0zwm56d``), and the configuration and the key store may name it
either way: everything that compares domains converts both sides to A-labels first.
Pure functions, no I/O (used by the policy and by the submission checks).
"""

from __future__ import annotations

import functools

import idna


@functools.lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """``domain`` as compared: lower-case, no final dot, A-labels (IDNA 2008 with the
    UTS 46 mapping) when it converts; a name that does not convert stays as it is."""
    domain = domain.rstrip(".").lower()
    if domain.isascii() and "xn--" not in domain:
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


@functools.lru_cache(maxsize=4096)
def unicode_domain(domain: str) -> str:
    """``domain`` with U-labels (the inverse of :func:`ascii_domain`), when it converts."""
    name = ascii_domain(domain)
    if "xn--" not in name:
        return name
    try:
        return str(idna.decode(name))
    except (idna.IDNAError, UnicodeError, ValueError):
        return name
