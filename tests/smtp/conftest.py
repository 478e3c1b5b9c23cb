"""Shared fixtures for the SMTP gateway tests: one throwaway PKI per session, a fresh
key store per test, a configuration written as TOML (so the real loader is used)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from smimeproxy.config import Config, load_config
from smimeproxy.keystore import MasterSecret, open_store
from smimeproxy.processing import MessageProcessor
from smimeproxy.testing import CertificateFactory
from tests.smtp.loopback import Gateway

PLAIN = (
    b"From: Alice <alice@acme.test>\r\n"
    b"To: Bob <bob@partner.test>\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <q3@acme.test>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"The figures are attached.\r\n"
    b".hidden line starting with a dot\r\n"
)


@pytest.fixture(scope="session")
def pki():
    f = CertificateFactory()
    return {
        "factory": f,
        "alice": f.user("alice@acme.test"),
        "dave": f.user("dave@acme.test"),
        "bob": f.user("bob@partner.test"),
    }


def write_config(
    directory: Path,
    smtp_extra: str = "",
    next_hop: str = "tcp:127.0.0.1:1",
    listen: str = "tcp:0:interface=127.0.0.1",
) -> Config:
    path = directory / "smimeproxy.toml"
    path.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"

[smime]
authserv_id = "mx.acme.test"

[smtp]
listen = ["{listen}"]
next_hop = "{next_hop}"
local_domains = ["acme.test"]
{smtp_extra}
"""
    )
    return load_config(path)


@pytest.fixture
def make_processor(tmp_path, pki) -> Callable[..., MessageProcessor]:
    """A processor over a new SQLite store: alice and dave (local, with keys), bob's
    certificate imported, the test root trusted."""

    def make(
        smtp_extra: str = "",
        next_hop: str = "tcp:127.0.0.1:1",
        listen: str = "tcp:0:interface=127.0.0.1",
    ) -> MessageProcessor:
        config = write_config(tmp_path, smtp_extra, next_hop, listen)
        store = open_store(
            f"sqlite:{tmp_path / 'store.db'}",
            MasterSecret(os.urandom(32), "test master key"),
            create=True,
        )
        store.add_trust(pki["factory"].root.certificate)
        for name in ("alice", "dave"):
            store.import_key(pki[name].private_key, pki[name].certificate)
        store.import_certificate(pki["bob"].certificate)
        processor = MessageProcessor(store, config.smime)
        processor.config = config  # type: ignore[attr-defined]  (handy for tests)
        return processor

    return make


class ThreadlessReactor(Clock):
    """A Clock that runs "thread" results at once (for deferToThreadPool)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class ImmediatePool:
    """A thread pool that runs the call in the calling thread (protocol tests only)."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


@pytest.fixture
def gateway(make_processor):
    """``make(sink, extra="")``: gateways on loopback ports, stopped after the test."""
    made = []

    def make(sink, extra=""):
        g = Gateway(make_processor, sink, extra)
        made.append(g)
        return g

    yield make
    for g in made:
        pytest_twisted.blockon(g.stop())


def server_certificate(pki, name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a TLS server ``name``, issued by the test root."""
    root = pki["factory"].root
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(root.private_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def tls_files(pki, tmp_path_factory):
    """A directory with the gateway's TLS certificate (``gw.pem``, for localhost), its
    key (``gw.key``) and the test root (``root.pem``)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = server_certificate(pki, "localhost")
    (d / "gw.pem").write_bytes(cert)
    (d / "gw.key").write_bytes(key)
    (d / "root.pem").write_bytes(pki["factory"].root.cert_pem)
    return d
