"""An archive world for tests: a config, a key store with users and trust, mail made
with Python's ``mailbox``, encrypted and signed by ``openssl cms``.

RSA keys are slow to make: the certificates are made once per test module
(``pki``), each test gets its own store and directories (``world``).
"""

from __future__ import annotations

import email.utils
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smimeproxy.archive.operations import LocalArchive
from smimeproxy.config import Config, load_config
from smimeproxy.keystore import SyncStore, create_key_file
from smimeproxy.processing import MessageProcessor, open_configured_store
from smimeproxy.testing import CertificateFactory, Issued

ALICE = "alice@acme.test"
BOB = "bob@acme.test"
CAROL = "carol@partner.test"

CONFIG = """\
[keystore]
url = "sqlite:var/store.db"
master_key_file = "var/master.key"

[smime]
authserv_id = "acme.test"
revocation = "off"

[archive]
index_dir = "var/index"
"""


@dataclass
class PKI:
    factory: CertificateFactory
    alice_old: Issued
    alice: Issued
    bob: Issued
    carol: Issued


@pytest.fixture(scope="module")
def pki() -> PKI:
    f = CertificateFactory()
    return PKI(f, f.user(ALICE), f.user(ALICE), f.user(BOB), f.user(CAROL))


@dataclass
class World:
    root: Path
    config: Config
    store: SyncStore
    processor: MessageProcessor
    pki: PKI

    def archive(self) -> LocalArchive:
        assert self.config.archive is not None
        return LocalArchive.open(self.config.archive.index_dir)

    def pem(self, issued: Issued, name: str) -> tuple[str, str]:
        cert = self.root / f"{name}.crt"
        key = self.root / f"{name}.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        return str(cert), str(key)


@pytest.fixture
def world(tmp_path: Path, pki: PKI) -> Iterator[World]:
    """Alice (one rotated-out key and a current one), Bob, the root trusted; Carol
    is a partner whose certificate is trusted through the same root."""
    (tmp_path / "var").mkdir()
    create_key_file(tmp_path / "var" / "master.key")
    path = tmp_path / "smimeproxy.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    store = open_configured_store(config, create=True)
    store.add_trust(pki.factory.root.certificate)
    store.import_key(pki.alice_old.private_key, pki.alice_old.certificate)
    store.rotate(ALICE, pki.alice.private_key, pki.alice.certificate)
    store.import_key(pki.bob.private_key, pki.bob.certificate)
    processor = MessageProcessor(store, config.smime)
    yield World(tmp_path, config, store, processor, pki)
    store.close()


def plain(
    subject: str,
    body: str,
    *,
    sender: str = CAROL,
    to: str = ALICE,
    date: str = "Mon, 02 Feb 2026 10:00:00 +0000",
    html: str | None = None,
    attachment: tuple[str, str] | None = None,
    message_id: str | None = None,
) -> bytes:
    """A message as bytes (CRLF), optionally with an HTML alternative and a text
    attachment ``(filename, text)``."""
    mid = message_id or email.utils.make_msgid(domain="partner.test")
    head = (
        f"From: Carol <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: {mid}\r\nMIME-Version: 1.0\r\n"
    )
    if html is None and attachment is None:
        return (head + f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()
    parts = [f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"]
    if html is not None:
        parts.append(f"Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n")
    if attachment is not None:
        name, text = attachment
        parts.append(
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n{text}\r\n'
        )
    b = "b0undary"
    out = head + f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n'
    for p in parts:
        out += f"--{b}\r\n{p}"
    return (out + f"--{b}--\r\n").encode()


def openssl_cms(
    openssl: str, tmp: Path, args: list[str], data: bytes, certs: list[str] | None = None
) -> bytes:
    """Run ``openssl cms ARGS -in .. -out .. CERTS`` on ``data``; its S/MIME output."""
    tmp.mkdir(exist_ok=True)
    src = tmp / "in.eml"
    src.write_bytes(data)
    dst = tmp / "out.eml"
    subprocess.run(
        [openssl, "cms", *args, "-in", str(src), "-out", str(dst), *(certs or [])],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return dst.read_bytes()


def cms(
    world: World, openssl: str, data: bytes, args: list[str], certs: list[str] | None = None
) -> bytes:
    """``openssl cms ARGS`` over the content of a whole message, the message's other
    headers kept outside (as a mail client does)."""
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    keep = [x for x in lines if not x.lower().startswith((b"content-", b"mime-version"))]
    content = [x for x in lines if x.lower().startswith(b"content-")]
    inner = b"\r\n".join(content) + b"\r\n\r\n" + body
    out = openssl_cms(openssl, world.root / "cms", args, inner, certs)
    out = out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return b"\r\n".join(keep) + b"\r\n" + out


def encrypt(world: World, openssl: str, data: bytes, *recipients: Issued) -> bytes:
    certs = [world.pem(r, f"rcpt{i}")[0] for i, r in enumerate(recipients)]
    return cms(world, openssl, data, ["-encrypt", "-aes256"], certs)


def sign(world: World, openssl: str, data: bytes, signer: Issued) -> bytes:
    cert, key = world.pem(signer, "signer")
    return cms(world, openssl, data, ["-sign", "-signer", cert, "-inkey", key])
