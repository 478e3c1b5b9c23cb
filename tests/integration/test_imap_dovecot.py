"""The IMAP proxy in front of a real Dovecot: clients see decrypted mail, the server
keeps ciphertext, everything else passes through.

One Dovecot and one proxy process for the module; each test works in its own mailbox.
"""

from __future__ import annotations

import imaplib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smimeproxy.smime.sealer import seal
from tests.conftest import require_tool
from tests.integration.imap_world import World, plain_message, start_world
from tests.modules import require_module
from tests.procs import children


@pytest.fixture(scope="module", params=[0, 1], ids=["threads", "workers"])
def world(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[World]:
    """Every test twice: decrypting in the proxy's thread pool, and in an engine worker
    process (``[imap] workers = 1``): same answers, same key isolation."""
    require_tool("dovecot")
    w = start_world(tmp_path_factory.mktemp("imap"), extra=f"workers = {request.param}")
    w.workers = request.param  # type: ignore[attr-defined]
    yield w
    w.stop()


def mailbox(world: World, name: str, messages: list[bytes], user: str = "alice") -> None:
    c = world.direct(user)
    c.create(name)
    for data in messages:
        assert c.append(name, None, None, data)[0] == "OK"
    c.logout()


def body_of(data: list) -> bytes:
    return next(part[1] for part in data if isinstance(part, tuple))


def fetch(c: imaplib.IMAP4, uid: str, item: str) -> list:
    typ, data = c.uid("FETCH", uid, item)
    assert typ == "OK", data
    return data


def test_capabilities_are_filtered(world: World) -> None:
    c = imaplib.IMAP4("127.0.0.1", world.proxy_port)
    caps = set(c.capabilities)
    assert "AUTH=PLAIN" in caps and "IMAP4REV1" in caps
    assert not any(cap.startswith(("COMPRESS", "AUTH=LOGIN", "STARTTLS")) for cap in caps)
    assert "LOGINDISABLED" not in caps  # plaintext_login = true (loopback test listener)
    c.login("alice", "alice-pw")
    _typ, data = c.capability()
    after = data[0].split()
    assert b"MOVE" in after and b"UIDPLUS" in after and b"CONDSTORE" in after
    assert not any(cap.startswith(b"COMPRESS") for cap in after)
    c.logout()


def test_plain_messages_pass_through_unchanged(world: World) -> None:
    msg = plain_message("plain", "just text")
    mailbox(world, "Plain", [msg])
    c, d = world.client(), world.direct()
    for conn in (c, d):
        conn.select("Plain")
    # (FLAGS differ: \\Recent goes to the first session that selects the mailbox)
    item = "(UID INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[] BINARY.PEEK[1])"
    assert fetch(c, "1:*", item) == fetch(d, "1:*", item)
    c.logout()
    d.logout()


def test_encrypted_message_is_answered_decrypted(world: World) -> None:
    mailbox(world, "Enc", [world.encrypted("secret subject", "the hidden body text")])
    c, d = world.client(), world.direct()
    c.select("Enc")
    d.select("Enc")
    whole = body_of(fetch(c, "1", "(BODY.PEEK[])"))
    assert b"the hidden body text" in whole
    assert b"Authentication-Results:" in whole
    assert b"pkcs7-mime" not in whole.split(b"\r\n\r\n")[0].lower()
    size = fetch(c, "1", "(RFC822.SIZE)")[0]
    assert int(re.search(rb"RFC822.SIZE (\d+)", size).group(1)) == len(whole)
    header = body_of(fetch(c, "1", "(BODY.PEEK[HEADER])"))
    text = body_of(fetch(c, "1", "(BODY.PEEK[TEXT])"))
    assert header + text == whole
    assert body_of(fetch(c, "1", "(RFC822.HEADER)")) == header
    # server-owned items stay the server's
    for item in ("(ENVELOPE)", "(INTERNALDATE)", "(UID)"):
        assert fetch(c, "1", item) == fetch(d, "1", item)
    structure = fetch(c, "1", "(BODYSTRUCTURE)")[0]
    assert b"application" not in structure.lower() and b'"text" "plain"' in structure.lower()
    # the server itself still holds ciphertext
    assert b"pkcs7-mime" in body_of(fetch(d, "1", "(BODY.PEEK[HEADER])")).lower()
    c.logout()
    d.logout()


def test_chunked_fetch_is_consistent(world: World) -> None:
    """Thunderbird-style: size first, then BODY.PEEK[]<n.m> chunks, then structure."""
    mailbox(world, "Chunks", [world.encrypted("chunks", "line\r\n" * 3000)])
    c = world.client()
    c.select("Chunks")
    first = fetch(c, "1", "(UID RFC822.SIZE BODYSTRUCTURE)")[0]
    size = int(re.search(rb"RFC822.SIZE (\d+)", first).group(1))
    chunks = []
    for origin in range(0, size, 4096):
        data = fetch(c, "1", f"(BODY.PEEK[]<{origin}.4096>)")
        chunks.append(body_of(data))
    whole = b"".join(chunks)
    assert len(whole) == size
    assert whole == body_of(fetch(c, "1", "(BODY.PEEK[])"))
    assert fetch(c, "1", "(UID RFC822.SIZE BODYSTRUCTURE)")[0] == first
    c.logout()


def test_non_peek_fetch_sets_seen(world: World) -> None:
    mailbox(world, "Seen", [world.encrypted("seen", "read me")])
    c = world.client()
    c.select("Seen")
    data = fetch(c, "1", "(BODY[])")
    assert b"read me" in body_of(data)
    c.logout()
    d = world.direct()
    d.select("Seen")
    assert b"\\Seen" in fetch(d, "1", "(FLAGS)")[0]
    d.logout()


def test_engine_worker_processes_as_configured(world: World) -> None:
    """With ``workers = 1`` the proxy runs one engine worker process beside it (with 0,
    none), and an encrypted message is answered decrypted either way."""
    mailbox(world, "Where", [world.encrypted("where", "where am I opened")])
    c = world.client("alice")
    c.select("Where")
    assert b"where am I opened" in body_of(fetch(c, "1", "(BODY.PEEK[])"))
    c.logout()
    assert len(children(world.proxy.pid)) == world.workers  # type: ignore[attr-defined]


def test_key_isolation(world: World) -> None:
    """Bob's message in Alice's mailbox stays encrypted for Alice; Carol (no keys) gets
    a plain pass-through session."""
    bobs = world.encrypted("for bob", "bob only", to=world.bob)
    mailbox(world, "Isolation", [bobs, world.encrypted("for alice", "alice text")])
    c, d = world.client(), world.direct()
    c.select("Isolation")
    d.select("Isolation")
    assert fetch(c, "1", "(BODY.PEEK[])") == fetch(d, "1", "(BODY.PEEK[])")  # as stored
    assert b"alice text" in body_of(fetch(c, "2", "(BODY.PEEK[])"))
    c.logout()
    d.logout()
    mailbox(world, "CarolBox", [world.encrypted("x", "alice text")], user="carol")
    carol = world.client("carol")
    carol.select("CarolBox")
    assert b"alice text" not in body_of(fetch(carol, "1", "(BODY.PEEK[])"))
    carol.logout()


def test_append_to_sent_is_encrypted(world: World) -> None:
    c = world.client()
    msg = plain_message("my sent mail", "sent body words", sender="alice@acme.test")
    date = imaplib.Time2Internaldate(time.time() - 86400 * 3)
    typ, data = c.append("Sent", "(\\Seen $Label1)", date, msg)
    assert typ == "OK", data
    uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
    c.select("Sent")
    assert b"sent body words" in body_of(fetch(c, uid, "(BODY.PEEK[])"))
    c.logout()
    d = world.direct()
    d.select("Sent")
    stored = body_of(fetch(d, uid, "(BODY.PEEK[])"))
    assert b"sent body words" not in stored and b"application/pkcs7-mime" in stored
    meta = fetch(d, uid, "(FLAGS INTERNALDATE)")[0]
    assert b"$Label1" in meta and b"\\Seen" in meta
    assert date.strip('"')[:11].encode() in meta
    d.logout()


def test_append_elsewhere_passes_through(world: World) -> None:
    c = world.client()
    c.create("Notes")
    msg = plain_message("note", "stays plain")
    assert c.append("Notes", None, None, msg)[0] == "OK"
    c.logout()
    d = world.direct()
    d.select("Notes")
    assert body_of(fetch(d, "1", "(BODY.PEEK[])")) == msg
    d.logout()


def test_search_body_matches_encrypted(world: World) -> None:
    mailbox(
        world,
        "Search",
        [
            plain_message("p1", "zebra plain"),
            world.encrypted("e1", "zebra hidden"),
            world.encrypted("e2", "giraffe hidden"),
        ],
    )
    c = world.client()
    c.select("Search")
    assert c.search(None, "BODY", "zebra")[1][0].split() == [b"1", b"2"]
    assert c.search(None, "NOT", "BODY", "zebra")[1][0].split() == [b"3"]
    assert c.search(None, "OR", "TEXT", "giraffe", "SUBJECT", "p1")[1][0].split() == [b"1", b"3"]
    assert c.uid("SEARCH", "BODY", "hidden", "NOT", "SUBJECT", "e2")[1][0].split() == [b"2"]
    c.logout()


def test_imapclient_library(world: World) -> None:
    imapclient = require_module("imapclient")
    mailbox(
        world, "IMAPClient", [world.encrypted("lib", "via imapclient"), plain_message("p", "q")]
    )
    client = imapclient.IMAPClient("127.0.0.1", port=world.proxy_port, ssl=False)
    client.login("alice", "alice-pw")
    client.select_folder("IMAPClient")
    got = client.fetch([1, 2], ["RFC822", "RFC822.SIZE", "FLAGS"])
    assert b"via imapclient" in got[1][b"RFC822"]
    assert got[1][b"RFC822.SIZE"] == len(got[1][b"RFC822"])
    assert got[2][b"RFC822"].endswith(b"q\r\n")
    client.logout()


def test_mbsync_syncs_decrypted(world: World, tmp_path: Path) -> None:
    mbsync = require_tool("mbsync")
    mailbox(world, "Sync", [world.encrypted(f"m{i}", f"synced body {i}") for i in range(3)])
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"""IMAPAccount proxy
Host 127.0.0.1
Port {world.proxy_port}
User alice
Pass alice-pw
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account proxy

MaildirStore local
Path {local}/
Inbox {local}/INBOX

Channel sync
Far :remote:Sync
Near :local:Sync
Create Near
Sync Pull
SyncState *
"""
    )
    result = subprocess.run(
        [mbsync, "-c", str(rc), "sync"], capture_output=True, timeout=60, text=True
    )
    assert result.returncode == 0, result.stderr
    files = [
        p for p in (local / "Sync").rglob("*") if p.is_file() and p.parent.name in ("cur", "new")
    ]
    assert len(files) == 3
    bodies = sorted(p.read_bytes() for p in files)
    for i in range(3):
        assert any(f"synced body {i}".encode() in b for b in bodies)
    assert not any(b"application/pkcs7-mime" in b.split(b"\r\n\r\n")[0] for b in bodies)


def raw(world: World) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", world.proxy_port), timeout=10)
    assert s.recv(4096).startswith(b"* OK")
    return s


def read_until(s: socket.socket, token: bytes) -> bytes:
    data = b""
    while token not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def count(world: World, name: str) -> int:
    d = world.direct()
    _typ, data = d.select(name)
    d.logout()
    return int(data[0])


@pytest.mark.parametrize("folder", ["Sent", "Drop"])
def test_client_drop_mid_append_appends_nothing(world: World, folder: str) -> None:
    if folder != "Sent":
        mailbox(world, folder, [])
    before = count(world, folder)
    s = raw(world)
    s.sendall(b"a LOGIN alice alice-pw\r\n")
    read_until(s, b"a OK")
    time.sleep(0.3)  # let the proxy map the login
    s.sendall(b"b APPEND " + folder.encode() + b" {1000}\r\n")
    assert read_until(s, b"\r\n").startswith(b"+")
    s.sendall(b"Subject: half\r\n\r\n" + b"x" * 400)
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)
    assert count(world, folder) == before


def test_garbage_and_long_lines(world: World) -> None:
    s = raw(world)
    s.sendall(b"\x00\xff garbage\r\n")
    assert b"BAD" in read_until(s, b"\r\n")
    s.sendall(b"x" * 200_000 + b"\r\n")
    got = read_until(s, b"\r\n")
    assert got == b"* BAD line too long\r\n"
    s.close()
    c = world.client()  # the proxy still serves
    assert c.noop()[0] == "OK"
    c.logout()


def test_idle_passes_through(world: World) -> None:
    mailbox(world, "Idle", [])
    s = raw(world)
    s.sendall(b"a LOGIN alice alice-pw\r\nb SELECT Idle\r\n")
    read_until(s, b"b OK")
    s.sendall(b"c IDLE\r\n")
    assert read_until(s, b"\r\n").startswith(b"+")
    world.append("Idle", plain_message("new", "arrives"))
    assert b"EXISTS" in read_until(s, b"EXISTS")
    s.sendall(b"DONE\r\n")
    assert b"c OK" in read_until(s, b"c OK")
    s.close()


def test_fifty_concurrent_sessions(world: World) -> None:
    mailbox(world, "Busy", [world.encrypted("busy", "concurrent body"), plain_message("p", "q")])
    errors: list[BaseException] = []

    def session() -> None:
        try:
            c = world.client()
            c.select("Busy", readonly=True)
            for _ in range(3):
                assert b"concurrent body" in body_of(fetch(c, "1", "(BODY.PEEK[])"))
                assert fetch(c, "2", "(BODY.PEEK[])")
            c.logout()
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=session) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert time.monotonic() - started < 90
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{world.proxy.pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    assert rss_kb < 400 * 1024  # the cache (64 MiB) plus a little per connection


def tls_files(directory: Path) -> tuple[Path, Path, bytes]:
    """A throwaway self-signed server certificate for 127.0.0.1 (cert, key, PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imap proxy test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "tls.crt").write_bytes(pem)
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "tls.crt", directory / "tls.key", pem


def test_starttls_and_implicit_tls_listeners(tmp_path_factory: pytest.TempPathFactory) -> None:
    """LOGINDISABLED until STARTTLS on a non-loopback-trusted listener; implicit TLS too."""
    import ssl

    base = tmp_path_factory.mktemp("imaptls")
    cert, key, pem = tls_files(base)
    context = ssl.create_default_context(cadata=pem.decode())
    w = start_world(
        base,
        plaintext_login=False,
        extra=f'tls_certificate = "{cert}"\ntls_key = "{key}"\n',
    )
    try:
        c = imaplib.IMAP4("127.0.0.1", w.proxy_port)
        assert "LOGINDISABLED" in c.capabilities and "STARTTLS" in c.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            c.login("alice", "alice-pw")
        c.starttls(ssl_context=context)
        assert "LOGINDISABLED" not in c.capabilities and "STARTTLS" not in c.capabilities
        c.login("alice", "alice-pw")
        c.create("TLS")
        c.append("TLS", None, None, w.encrypted("tls", "over tls"))
        c.select("TLS")
        assert b"over tls" in body_of(fetch(c, "1", "(BODY.PEEK[])"))
        c.logout()
    finally:
        w.stop()
    base2 = tmp_path_factory.mktemp("imaps")
    cert, key, pem = tls_files(base2)
    w = start_world(
        base2,
        plaintext_login=False,
        listen=f"ssl:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    try:
        c = imaplib.IMAP4_SSL(
            "127.0.0.1", w.proxy_port, ssl_context=ssl.create_default_context(cadata=pem.decode())
        )
        assert "LOGINDISABLED" not in c.capabilities
        c.login("alice", "alice-pw")
        assert c.noop()[0] == "OK"
        c.logout()
    finally:
        w.stop()


def test_sighup_swaps_the_tls_certificate_for_new_handshakes_only(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A reload that names a new certificate: the next STARTTLS handshake presents it;
    a session that negotiated TLS before the reload stays up and keeps working."""
    import signal
    import ssl

    base = tmp_path_factory.mktemp("imaptls-reload")
    (base / "old").mkdir()
    (base / "new").mkdir()
    cert, key, old_pem = tls_files(base / "old")
    new_cert, new_key, new_pem = tls_files(base / "new")
    w = start_world(
        base, plaintext_login=False, extra=f'tls_certificate = "{cert}"\ntls_key = "{key}"\n'
    )
    try:
        before = imaplib.IMAP4("127.0.0.1", w.proxy_port)
        before.starttls(ssl_context=ssl.create_default_context(cadata=old_pem.decode()))
        before.login("alice", "alice-pw")
        before.create("Reload")
        before.append("Reload", None, None, w.encrypted("reload", "still readable"))
        before.select("Reload")
        old_der = before.sock.getpeercert(binary_form=True)

        w.config.write_text(
            w.config.read_text().replace(str(cert), str(new_cert)).replace(str(key), str(new_key))
        )
        w.proxy.send_signal(signal.SIGHUP)
        assert w.proxy.stdout is not None
        assert w.proxy.stdout.readline().strip() == b"RELOADED"

        after = imaplib.IMAP4("127.0.0.1", w.proxy_port)
        after.starttls(ssl_context=ssl.create_default_context(cadata=new_pem.decode()))
        new_der = after.sock.getpeercert(binary_form=True)
        assert new_der != old_der
        assert ssl.DER_cert_to_PEM_cert(new_der).encode().strip() == new_pem.strip()
        after.login("alice", "alice-pw")
        assert after.noop()[0] == "OK"
        after.logout()
        # the old certificate is no longer presented to new handshakes
        refused = imaplib.IMAP4("127.0.0.1", w.proxy_port)
        with pytest.raises(ssl.SSLCertVerificationError):
            refused.starttls(ssl_context=ssl.create_default_context(cadata=old_pem.decode()))
        refused.sock.close()
        # the session from before the reload: same TLS connection, still served
        assert before.sock.getpeercert(binary_form=True) == old_der
        assert b"still readable" in body_of(fetch(before, "1", "(BODY.PEEK[])"))
        before.logout()
    finally:
        w.stop()


def test_sighup_reloads_the_files_of_an_implicit_tls_listener(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``ssl:`` listener: certificate files replaced in place, SIGHUP, and the next
    handshake presents the new certificate; the session from before stays up."""
    import signal
    import ssl

    base = tmp_path_factory.mktemp("imaps-reload")
    cert, key, old_pem = tls_files(base)
    w = start_world(
        base,
        plaintext_login=False,
        listen=f"ssl:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    try:
        before = imaplib.IMAP4_SSL(
            "127.0.0.1",
            w.proxy_port,
            ssl_context=ssl.create_default_context(cadata=old_pem.decode()),
        )
        before.login("alice", "alice-pw")
        (base / "next").mkdir()
        new_cert, new_key, new_pem = tls_files(base / "next")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        w.proxy.send_signal(signal.SIGHUP)
        assert w.proxy.stdout is not None
        assert w.proxy.stdout.readline().strip() == b"RELOADED"
        after = imaplib.IMAP4_SSL(
            "127.0.0.1",
            w.proxy_port,
            ssl_context=ssl.create_default_context(cadata=new_pem.decode()),
        )
        assert after.sock.getpeercert(binary_form=True) != before.sock.getpeercert(binary_form=True)
        after.login("alice", "alice-pw")
        after.logout()
        assert before.noop()[0] == "OK"
        before.logout()
        # a key that does not load: the reload is refused, the listener keeps serving
        key.write_bytes(b"not a key")
        w.proxy.send_signal(signal.SIGHUP)
        assert w.proxy.stdout.readline().startswith(b"RELOAD FAILED ConfigError")
        again = imaplib.IMAP4_SSL(
            "127.0.0.1",
            w.proxy_port,
            ssl_context=ssl.create_default_context(cadata=new_pem.decode()),
        )
        again.login("alice", "alice-pw")
        again.logout()
    finally:
        w.stop()


def test_upstream_starttls_verifies_the_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    """upstream_tls = "starttls": the proxy upgrades its link to Dovecot and checks the
    certificate against upstream_ca_file; a certificate it does not trust fails closed."""
    base = tmp_path_factory.mktemp("upstls")
    cert, key, _pem = tls_files(base)
    w = start_world(
        base,
        upstream_tls="starttls",
        dovecot_tls=(cert, key),
        extra=f'upstream_ca_file = "{cert}"\nupstream_tls_hostname = "127.0.0.1"\n',
    )
    try:
        c = w.client()
        c.create("UpTLS")
        c.append("UpTLS", None, None, w.encrypted("up", "through upstream tls"))
        c.select("UpTLS")
        assert b"through upstream tls" in body_of(fetch(c, "1", "(BODY.PEEK[])"))
        c.logout()
        log = w.dovecot.log()
        assert "TLS" in log  # Dovecot logged the sessions as TLS ones
    finally:
        w.stop()
    base2 = tmp_path_factory.mktemp("upstls-bad")
    cert, key, _pem = tls_files(base2)
    other, _k, _p = tls_files(tmp_path_factory.mktemp("other-ca"))
    w = start_world(
        base2,
        upstream_tls="starttls",
        dovecot_tls=(cert, key),
        extra=f'upstream_ca_file = "{other}"\nupstream_tls_hostname = "127.0.0.1"\n',
    )
    try:
        with pytest.raises((imaplib.IMAP4.error, OSError, EOFError)) as failed:
            c = imaplib.IMAP4("127.0.0.1", w.proxy_port)
            c.login("alice", "alice-pw")
        assert "upstream" in str(failed.value)
    finally:
        w.stop()


@pytest.mark.parametrize("folder", ["Sent", "LitPlain"])
def test_append_with_mailbox_as_literal(world: World, folder: str) -> None:
    """A mailbox name sent as a synchronising literal cannot bypass Sent encryption."""
    if folder != "Sent":
        mailbox(world, folder, [])
    before = count(world, folder)
    msg = plain_message("literal box", "literal mailbox words", sender="alice@acme.test")
    s = raw(world)
    s.sendall(b"a LOGIN alice alice-pw\r\n")
    read_until(s, b"a OK")
    s.sendall(b"b APPEND {%d}\r\n" % len(folder))
    assert read_until(s, b"\r\n").startswith(b"+")
    s.sendall(folder.encode() + b" {%d}\r\n" % len(msg))
    assert read_until(s, b"\r\n").startswith(b"+")
    s.sendall(msg + b"\r\n")
    assert b"b OK" in read_until(s, b"b ")
    s.sendall(b"c LOGOUT\r\n")
    read_until(s, b"c OK")
    s.close()
    assert count(world, folder) == before + 1
    d = world.direct()
    d.select(folder)
    stored = body_of(fetch(d, "*", "(BODY.PEEK[])"))
    d.logout()
    if folder == "Sent":
        assert b"literal mailbox words" not in stored and b"application/pkcs7-mime" in stored
    else:
        assert stored == msg


UUENCODED = (
    b"From: dave@partner.test\r\nTo: alice@acme.test\r\nSubject: cte\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\n"
    b"hello\r\n--zz\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\nend\r\n--zz--\r\n"
)


def _uid_fetch_raw(c: imaplib.IMAP4, items: str) -> tuple[str, list]:
    tag = c._command("UID", "FETCH", "1", items)
    try:
        typ, text = c._command_complete("UID", tag)
    except imaplib.IMAP4.error as exc:
        typ, text = "NO", [str(exc).encode()]
    return typ, [text, c.untagged_responses.pop("FETCH", None)]


@pytest.mark.parametrize(
    "items",
    ["(BINARY.PEEK[{p}2])", "(UID BINARY.SIZE[{p}2])", "(UID BINARY.PEEK[{p}1] BINARY.PEEK[{p}2])"],
)
def test_binary_of_unknown_cte_is_refused_like_dovecot(world: World, items: str) -> None:
    """The decrypted message is part 1 of the proxy's view (the footer is part 2)."""
    box = "Cte" + str(abs(hash(items)) % 10000)
    mailbox(world, box + "P", [UUENCODED])
    mailbox(world, box + "E", [seal(UUENCODED, recipients=[world.alice.certificate])])
    d, c = world.direct(), world.client()
    d.select(box + "P")
    c.select(box + "E")
    typ_d, (text_d, fetched_d) = _uid_fetch_raw(d, items.format(p=""))
    typ_c, (text_c, fetched_c) = _uid_fetch_raw(c, items.format(p="1."))
    assert typ_d == typ_c == "NO", (text_c, fetched_c)
    assert b"[UNKNOWN-CTE]" in text_d[0] and b"[UNKNOWN-CTE]" in text_c[0]
    # the items before the failing one, as Dovecot sends them
    assert repr(fetched_c).replace("[1.", "[") == repr(fetched_d)
    d.logout()
    c.logout()


def test_metrics_count_sessions_cache_and_decryptions(world: World) -> None:
    mailbox(world, "Metered", [world.encrypted("metered", "counted body")])
    before = world.metrics()
    c = world.client()
    c.select("Metered")
    during = world.metrics()
    assert during["smimeproxy_imap_sessions"] >= before.get("smimeproxy_imap_sessions", 0) + 1
    assert b"counted body" in body_of(fetch(c, "1", "(BODY.PEEK[])"))
    assert b"counted body" in body_of(fetch(c, "1", "(BODY.PEEK[TEXT])"))
    c.logout()
    after = world.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('smimeproxy_imap_decryptions_total{outcome="ok"}') == 1
    assert grew('smimeproxy_imap_cache_requests_total{result="miss"}') == 1
    assert grew('smimeproxy_imap_cache_requests_total{result="hit"}') == 1
    assert after["smimeproxy_imap_cache_bytes"] > 0
    time.sleep(0.2)
    assert world.metrics()["smimeproxy_imap_sessions"] == before.get("smimeproxy_imap_sessions", 0)


def test_stopping_says_bye_to_every_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    require_tool("dovecot")
    w = start_world(tmp_path_factory.mktemp("imap-stop"))
    try:
        sockets = []
        for _ in range(3):
            s = raw(w)
            s.sendall(b"a LOGIN alice alice-pw\r\n")
            read_until(s, b"a OK")
            sockets.append(s)
        w.proxy.terminate()
        for s in sockets:
            data = read_until(s, b"\r\n")
            assert data.startswith(b"* BYE server shutting down")
            assert s.recv(100) == b""  # and closed
            s.close()
        assert w.proxy.wait(10) == 0
    finally:
        w.stop()


def test_more_than_one_batch_of_encrypted_messages_all_open(world: World) -> None:
    """Ciphertexts are fetched in pipelined batches of 50: every message gets its own."""
    count = 60
    mailbox(
        world, "Batches", [world.encrypted(f"n{i}", f"marker-{i:03d}-end") for i in range(count)]
    )
    c = world.client()
    c.select("Batches", readonly=True)
    typ, data = c.uid("FETCH", "1:*", "(UID BODY.PEEK[TEXT])")
    assert typ == "OK"
    bodies = {
        int(re.search(rb"UID (\d+)", part[0]).group(1)): part[1]
        for part in data
        if isinstance(part, tuple)
    }
    assert len(bodies) == count
    for uid, text in bodies.items():
        assert b"marker-%03d-end" % (uid - 1) in text
    c.logout()


def _raw_fetch(conn: imaplib.IMAP4, tag: bytes, command: bytes) -> tuple[list[bytes], bytes]:
    """``(untagged responses, tagged reply)`` of one command, each response whole."""
    conn.send(tag + b" " + command + b"\r\n")
    responses = []
    while True:
        line = response = conn.readline()
        while (literal := re.search(rb"\{([0-9]+)\}\r\n\Z", line)) is not None:
            response += conn.read(int(literal.group(1)))
            line = conn.readline()
            response += line
        if response.startswith(tag + b" "):
            return responses, response
        responses.append(response)


def _fetch_items(responses: list[bytes]) -> list[list[tuple[bytes, bytes]]]:
    """Each FETCH response's items, content values left out, in a stable order (other
    responses whole: e.g. ``* FLAGS`` when another session used a new keyword)."""
    from smimeproxy.imap.fetch import content_item, fetch_items

    out = []
    for response in responses:
        if not re.match(rb"\* [0-9]+ FETCH ", response):
            out.append([(response, b"")])
            continue
        _seq, pairs = fetch_items(response)
        out.append([(n, b"" if content_item(n) else v) for n, v in pairs])
    return sorted(out)


@pytest.mark.parametrize("qresync", [False, True], ids=["plain", "qresync"])
@pytest.mark.parametrize(
    "command",
    [b"UID FETCH 1 (BODY.PEEK[])", b"UID FETCH 1:* (BODY.PEEK[])", b"FETCH 1 (BODY.PEEK[])"],
)
def test_flags_changed_by_another_session_get_no_second_body(
    world: World, command: bytes, qresync: bool
) -> None:
    """Another session's STORE makes Dovecot send ``* 1 FETCH (FLAGS (...))`` during the
    next command (RFC 9051 7.5.2; with QRESYNC enabled it names the UID, RFC 7162
    3.2.4): through the proxy it stays a flags update, as a direct session sees it,
    and the decrypted content comes once.  First while the proxy classifies and
    decrypts (its own commands run), then from the cache."""
    box = f"Flagged{abs(hash(command)) % 10000}{int(qresync)}"
    mailbox(world, box, [world.encrypted("flagged", "the flagged body")])
    c, d, other = world.client(), world.direct(), world.direct()
    if qresync:
        for conn in (c, d):
            assert conn.enable("QRESYNC")[0] == "OK"
    for conn in (other, c, d):  # \\Recent goes to the first: the writer
        conn.select(box)
    steps = [(b"UID FETCH 1 (BODY.PEEK[HEADER])", b"\\Flagged"), (command, b"$Important")]
    for step, (fetching, flag) in enumerate(steps):
        assert other.store("1", "+FLAGS", flag.decode())[0] == "OK"
        tag = b"x%d" % step
        proxied, done_c = _raw_fetch(c, tag, fetching)
        direct, done_d = _raw_fetch(d, tag, fetching)
        assert done_c.startswith(tag + b" OK") and done_d.startswith(tag + b" OK")
        assert any(flag in r for r in direct)  # Dovecot did send the update
        content = [r for r in proxied if b"BODY[" in r]
        assert len(content) == 1, proxied
        assert b"X-SMIMEProxy-Decryption" in content[0]
        assert _fetch_items(proxied) == _fetch_items(direct)
    assert b"the flagged body" in content[0]
    for conn in (c, d, other):
        conn.logout()


def test_non_uid_fetch_first_then_every_fetch_is_decrypted(world: World) -> None:
    """The first content FETCH after SELECT by sequence number: its two pipelined
    Content-Type queries are answered out of order by Dovecot; later fetches of the
    message, by UID or by number, are still decrypted."""
    mailbox(world, "SeqFirst", [plain_message("plain", "p"), world.encrypted("e", "seq body")])
    c = world.client()
    c.select("SeqFirst")
    for _round in range(2):
        typ, data = c.fetch("2", "(BODY.PEEK[TEXT])")
        assert typ == "OK" and b"seq body" in body_of(data)
        assert b"seq body" in body_of(fetch(c, "2", "(BODY.PEEK[TEXT])"))
    c.logout()


def test_first_sync_of_a_mixed_mailbox_keeps_the_servers_order(world: World) -> None:
    """A first sync that opens 40 stored S/MIME messages (the last of them still in the
    engine when the server answers the client's command): every response comes in the
    server's order, plain ones byte for byte as direct, encrypted ones with the decrypted
    message's structure and size; the next command's answer comes after them."""
    from smimeproxy.imap.fetch import fetch_items

    messages = [
        world.encrypted(f"e{i}", f"secret {i}")
        if i % 3 == 0
        else plain_message(f"p{i}", f"plain {i}")
        for i in range(120)
    ]
    mailbox(world, "Ordered", messages)
    command = b"UID FETCH 1:* (UID RFC822.SIZE BODYSTRUCTURE)"
    answers = {}
    for name, conn in (("direct", world.direct()), ("proxy", world.client())):
        conn.select("Ordered", readonly=True)
        responses, tagged = _raw_fetch(conn, b"s1", command)
        assert tagged.startswith(b"s1 OK")
        answers[name] = responses
        conn.logout()
    direct, proxied = answers["direct"], answers["proxy"]
    assert [r.split(b" FETCH ")[0] for r in proxied] == [r.split(b" FETCH ")[0] for r in direct]
    c = world.client()
    c.select("Ordered", readonly=True)
    for i, (d, p) in enumerate(zip(direct, proxied, strict=True)):
        if i % 3:
            assert p == d
            continue
        items = dict(fetch_items(p)[1])
        assert b"pkcs7-mime" not in items[b"BODYSTRUCTURE"].lower()
        assert b'"mixed"' in items[b"BODYSTRUCTURE"].lower()  # the message and the footer
        body = body_of(fetch(c, str(i + 1), "(BODY.PEEK[])"))
        assert int(items[b"RFC822.SIZE"]) == len(body)
        assert b"secret %d" % i in body
    c.logout()
