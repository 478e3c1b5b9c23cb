"""HTTP download of a local user's current certificate (twisted.web).

- ``GET /certs/<address>``: the certificate(s) as PEM (``application/pem-certificate-
  chain``, RFC 8555 section 9.1's type for concatenated PEM certificates);
- ``GET /certs/<address>.p7c``: a degenerate PKCS#7 SignedData holding them, DER,
  ``application/pkcs7-mime; smime-type=certs-only`` (RFC 8551 section 3.2.2, the
  ``.p7c`` extension of its section 3.2.1) that mail clients import directly.

404 for anyone we do not publish (unknown, other domain, revoked key), with the same
short body whatever the reason, so the server is no oracle for which addresses exist
beyond what DNS already tells. Answers are read live (``Cache-Control: no-cache``): a
rotation shows on the next request. Nothing is logged but the outcome and address.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from smimeproxy.directory.publication import LivePublication, Published

__all__ = ["CertificateResource", "CertificatesRoot", "make_site"]

PEM_TYPE = b"application/pem-certificate-chain"
P7C_TYPE = b"application/pkcs7-mime; smime-type=certs-only"
_MAX_ADDRESS = 320  # RFC 3696 errata: 64 + 1 + 255


def pem_body(published: Published) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in published.certificates)


def p7c_body(published: Published) -> bytes:
    return pkcs7.serialize_certificates(list(published.certificates), serialization.Encoding.DER)


class CertificateResource(resource.Resource):
    """One address's certificate, in one form."""

    isLeaf = True
    _log = Logger()

    def __init__(self, live: LivePublication, address: str, form: str) -> None:
        super().__init__()
        self.live = live
        self.address = address
        self.form = form

    def render_HEAD(self, request: server.Request) -> object:
        return self.render_GET(request)

    def render_GET(self, request: server.Request) -> object:
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

        def found(published: Published | None) -> None:
            if finished[0]:
                return
            request.setHeader(b"cache-control", b"no-cache")
            if published is None:
                self._log.info("certificate not found: {address}", address=self.address)
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"no certificate published for this address\n")
            else:
                body = pem_body(published) if self.form == "pem" else p7c_body(published)
                kind = PEM_TYPE if self.form == "pem" else P7C_TYPE
                request.setHeader(b"content-type", kind)
                if self.form == "p7c":
                    name = self.address.encode("ascii", "replace") + b".p7c"
                    request.setHeader(
                        b"content-disposition", b'attachment; filename="' + name + b'"'
                    )
                request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            self._log.failure("certificate lookup failed", failure)
            if not finished[0]:
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"the key store is not available\n")
                request.finish()

        self.live.by_address(self.address).addCallbacks(found, failed)
        return server.NOT_DONE_YET


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"no certificate published for this address\n"


class CertificatesRoot(resource.Resource):
    """``/certs/``: picks the address and the form from the next path segment."""

    def __init__(self, live: LivePublication) -> None:
        super().__init__()
        self.live = live

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return _NotFound()
        form = "pem"
        if name.endswith(".p7c"):
            name, form = name[: -len(".p7c")], "p7c"
        elif name.endswith(".pem"):
            name = name[: -len(".pem")]
        if "@" not in name or len(name) > _MAX_ADDRESS or request.postpath:
            return _NotFound()
        return CertificateResource(self.live, name.strip().lower(), form)


class _Root(_NotFound):
    isLeaf = False

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return _NotFound()


#: seconds an idle HTTP connection is kept (Twisted's default is 12 hours)
HTTP_IDLE_TIMEOUT = 60


def make_site(live: LivePublication) -> server.Site:
    """A site serving ``/certs/``; anything else is 404."""
    root = _Root()
    root.putChild(b"certs", CertificatesRoot(live))  # type: ignore[arg-type]
    site = server.Site(root, timeout=HTTP_IDLE_TIMEOUT)
    site.displayTracebacks = False
    return site
