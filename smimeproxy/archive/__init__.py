"""The archive: walk mailboxes, decrypt with each owner's key history, index, search, export.

Legal and compliance teams must find and produce every message years later, after any
number of key rotations (issue 6). The pieces, one idea per module:

* :mod:`.sources` -- Maildir trees, mbox files and the IMAP server, as a stream of
  :class:`~.sources.SourceMessage` with a stable identity;
* :mod:`.state` -- what was indexed already (incremental runs, resume, UIDVALIDITY);
* :mod:`.originals` -- the original bytes, content-addressed, so an export years later
  reproduces exactly what was stored (and its SHA-256);
* :mod:`.extract` -- searchable fields from an opened message;
* :mod:`.index` -- the index backend interface and its whoosh implementation;
* :mod:`.query` -- the query language;
* :mod:`.indexing` -- one index pass over sources (audited per owner);
* :mod:`.export` -- mbox or zip of .eml with a manifest, written atomically;
* :mod:`.job` -- the periodic pass inside the ``twistd`` service.
"""

from __future__ import annotations

# ArchiveError lives in the one exception tree; re-exported for the archive modules
from smimeproxy.errors import ArchiveError

__all__ = ["ArchiveError"]
