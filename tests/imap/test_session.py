"""The proxy session against a scripted upstream, on StringTransports (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smimeproxy.imap.session import ProxySession, SessionContext

GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+ COMPRESS=DEFLATE STARTTLS AUTH=PLAIN AUTH=LOGIN ID IDLE]"
    b" hi\r\n"
)


@dataclass
class User:
    address: str


class Store:
    """Only the two lookups the session makes."""

    def __init__(self, users: dict[str, str]):
        self.users = users

    def find_user(self, login: str) -> User | None:
        return User(self.users[login]) if login in self.users else None

    def keys(self, address: str) -> list[str]:
        return ["key"]


class Processor:
    def __init__(self, users: dict[str, str]):
        self.store = Store(users)


class Harness:
    def __init__(self, greeting: bytes = GREETING, **options: Any):
        self.up_transport = StringTransport()
        self.up: Protocol | None = None

        def connect(protocol: Protocol) -> Deferred[Protocol]:
            self.up = protocol
            protocol.makeConnection(self.up_transport)
            return succeed(protocol)

        options.setdefault("plaintext_login", True)
        self.ctx = SessionContext(
            connect_upstream=connect,
            run_blocking=lambda f, *a, **k: maybeDeferred(f, *a, **k),
            **options,
        )
        self.session = ProxySession(self.ctx)
        self.client = StringTransport()
        self.session.makeConnection(self.client)
        if greeting:
            self.server(greeting)

    def server(self, data: bytes) -> None:
        assert self.up is not None
        self.up.dataReceived(data)

    def send(self, data: bytes) -> None:
        self.session.dataReceived(data)

    def to_client(self) -> bytes:
        value = self.client.value()
        self.client.clear()
        return value

    def to_server(self) -> bytes:
        value = self.up_transport.value()
        self.up_transport.clear()
        return value


def test_greeting_capabilities_filtered() -> None:
    h = Harness()
    greeting = h.to_client()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN ID IDLE]")
    assert b"COMPRESS" not in greeting and b"AUTH=LOGIN" not in greeting


def test_logindisabled_before_tls_and_login_refused() -> None:
    h = Harness(plaintext_login=False, tls=object())
    greeting = h.to_client()
    assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting
    h.send(b"a LOGIN alice secret\r\n")
    assert h.to_client().startswith(b"a NO [PRIVACYREQUIRED]")
    assert h.to_server() == b""  # the password never left the proxy


def test_untagged_capability_response_filtered() -> None:
    h = Harness()
    h.to_client()
    h.send(b"c CAPABILITY\r\n")
    assert h.to_server() == b"c CAPABILITY\r\n"
    h.server(b"* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE MOVE\r\nc OK done\r\n")
    assert h.to_client() == b"* CAPABILITY IMAP4rev1 MOVE\r\nc OK done\r\n"


def test_compress_is_refused_locally() -> None:
    h = Harness()
    h.to_client()
    h.send(b"z COMPRESS DEFLATE\r\n")
    assert h.to_client().startswith(b"z BAD")
    assert h.to_server() == b""


def test_pipelined_commands_and_sync_literal_as_literal_plus() -> None:
    h = Harness()
    h.to_client()
    h.send(b"a NOOP\r\nb LOGIN {5}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"alice pw\r\n")
    assert h.to_server() == b"a NOOP\r\nb LOGIN {5+}\r\nalice pw\r\n"
    h.server(b"a OK noop\r\nb OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] in\r\n")
    assert h.to_client() == b"a OK noop\r\nb OK [CAPABILITY IMAP4rev1] in\r\n"


def test_sync_literal_waits_for_upstream_without_literal_plus() -> None:
    h = Harness(greeting=b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    h.to_client()
    h.send(b"b LOGIN {5}\r\n")
    h.send(b"alice pw\r\n")
    assert h.to_server() == b"b LOGIN {5}\r\n"
    h.server(b"+ go\r\n")
    assert h.to_server() == b"alice pw\r\n"
    assert h.to_client() == b"+ Ready for literal data\r\n"  # the server's + is not repeated


def test_append_literal_streams_to_server() -> None:
    h = Harness()
    h.to_client()
    h.send(b"a APPEND Archive {100000}\r\n")
    assert h.to_server() == b"a APPEND Archive {100000}\r\n"
    h.server(b"+ OK\r\n")
    assert h.to_client() == b"+ OK\r\n"
    h.send(b"x" * 40000)
    assert h.to_server() == b"x" * 40000  # forwarded before the literal is complete
    h.send(b"y" * 60000 + b"\r\n")
    assert h.to_server() == b"y" * 60000 + b"\r\n"


def test_server_literal_streams_to_client() -> None:
    h = Harness()
    h.to_client()
    h.send(b"f FETCH 1 BODY.PEEK[]\r\n")
    h.to_server()
    h.server(b"* 1 FETCH (BODY[] {50000}\r\n" + b"z" * 20000)
    assert h.to_client() == b"* 1 FETCH (BODY[] {50000}\r\n" + b"z" * 20000
    h.server(b"z" * 30000 + b")\r\nf OK done\r\n")
    assert h.to_client() == b"z" * 30000 + b")\r\nf OK done\r\n"


def test_pass_through_responses_cut_anywhere_arrive_unchanged() -> None:
    """Reads that pass through whole are written as they came; reads that start or end
    inside a line are not mistaken for them (every cut point of a response stream)."""
    stream = (
        b"* 1 FETCH (UID 4 BODY[] {12}\r\nhello\r\nworld)\r\n* 2 EXISTS\r\n"
        b"* 2 FETCH (BODY[] {0}\r\n)\r\nf OK done\r\n"
    )
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            h = Harness()
            h.to_client()
            h.send(b"f FETCH 1:2 BODY.PEEK[]\r\n")
            for part in (stream[:i], stream[i:j], stream[j:]):
                h.server(part)
            assert h.to_client() == stream, (i, j)


def test_upstream_drop_mid_literal_sends_bye() -> None:
    h = Harness()
    h.to_client()
    h.send(b"f FETCH 1 BODY.PEEK[]\r\n")
    h.server(b"* 1 FETCH (BODY[] {50000}\r\n" + b"z" * 100)
    h.to_client()
    assert h.up is not None
    h.up.connectionLost(None)
    assert b"* BYE" in h.to_client()
    assert h.client.disconnecting


def test_client_drop_mid_append_aborts_upstream() -> None:
    h = Harness()
    h.to_client()
    h.send(b"a APPEND Archive {1000}\r\n")
    h.server(b"+ OK\r\n")
    h.send(b"partial")
    h.session.connectionLost(None)
    assert h.up_transport.disconnecting  # the server never sees the literal complete


def test_idle_done_is_forwarded_raw() -> None:
    h = Harness()
    h.to_client()
    h.send(b"i IDLE\r\n")
    h.server(b"+ idling\r\n* 3 EXISTS\r\n")
    h.send(b"DONE\r\n")
    assert h.to_server() == b"i IDLE\r\nDONE\r\n"
    h.server(b"i OK idle done\r\n")
    assert h.to_client().endswith(b"* 3 EXISTS\r\ni OK idle done\r\n")


def test_garbage_gets_bad_not_forwarded() -> None:
    h = Harness(max_line=1000)
    h.to_client()
    h.send(b"\r\n" + b"q" * 5000 + b"\r\n")
    out = h.to_client()
    assert b"BAD" in out
    assert h.to_server() == b""
    h.send(b"n NOOP\r\n")
    assert h.to_server() == b"n NOOP\r\n"


def test_login_maps_user_and_learns_sent_folder() -> None:
    h = Harness(processor=Processor({"alice": "alice@acme.test"}), sent_folders=())
    h.to_client()
    h.send(b"a LOGIN alice pw\r\nb APPEND Outbox {3}\r\n")
    assert h.to_server() == b"a LOGIN alice pw\r\n"
    h.server(b"a OK logged in\r\n")
    assert h.to_server() == b'smp1 LIST "" "*" RETURN (SPECIAL-USE)\r\n'
    h.server(b'* LIST (\\Sent) "/" Outbox\r\n* LIST () "/" INBOX\r\nsmp1 OK done\r\n')
    assert h.session.user == User("alice@acme.test")
    # the LIST answers were the proxy's own: the client sees only its LOGIN reply
    assert h.to_client() == b"a OK logged in\r\n+ Ready for literal data\r\n"
    assert "outbox" in h.session.sent
    h.send(b"abc\r\n")  # collected for encryption, not streamed
    assert h.to_server() == b""


def test_login_without_keys_is_pass_through() -> None:
    h = Harness(processor=Processor({}))
    h.to_client()
    h.send(b"a AUTHENTICATE PLAIN AGNhcm9sAHB3\r\n")
    h.server(b"a OK in\r\n")
    h.server(b"smp1 OK listed\r\n")  # the listing ran alongside the store lookup
    assert h.session.login == "carol" and h.session.user is None
    h.send(b"b APPEND Sent {3}\r\n")
    assert h.to_server().endswith(b"b APPEND Sent {3}\r\n")  # streamed straight on


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8), st.lists(st.binary(max_size=80), max_size=8))
def test_fuzz_never_raises(client_chunks: list[bytes], server_chunks: list[bytes]) -> None:
    """Arbitrary bytes from either side, cut anywhere: no exception escapes the protocol."""
    h = Harness(max_line=200)
    for c, s in zip(client_chunks, server_chunks, strict=False):
        h.send(c)
        h.server(s)
    h.session.connectionLost(None)


def test_oversized_sync_literal_refused_before_it_is_sent() -> None:
    h = Harness(max_command=100)
    h.to_client()
    h.send(b"s SEARCH TEXT {5000}\r\n")
    assert h.to_client() == b"s NO [TOOBIG] too large for this proxy\r\n"
    h.send(b"n NOOP\r\n")  # the next line is a command again, not literal data
    assert h.to_server() == b"n NOOP\r\n"


def test_make_service_one_listener_per_endpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.testing import MemoryReactor

    from smimeproxy.config import load_config
    from smimeproxy.imap import make_service

    (tmp_path / "master.key").write_bytes(b"x" * 32)
    config = tmp_path / "c.toml"
    config.write_text(
        '[keystore]\nurl = "sqlite:s.db"\nmaster_key_file = "master.key"\n'
        '[imap]\nlisten = ["tcp:1143:interface=127.0.0.1", "tcp:1144:interface=127.0.0.1"]\n'
        'upstream = "tcp:127.0.0.1:143"\nupstream_tls = "none"\n'
    )
    service = make_service(load_config(config), reactor=MemoryReactor())
    children = list(service)
    assert len(children) == 2
    assert all(isinstance(c, StreamServerEndpointService) for c in children)


def test_delegation_adds_owners_for_decryption() -> None:
    h = Harness(
        processor=Processor({"alice": "alice@acme.test"}),
        delegation={"alice@acme.test": ("sales@acme.test",)},
    )
    h.to_client()
    h.send(b"a LOGIN alice pw\r\n")
    h.server(b"a OK in\r\n")
    h.server(b"smp1 OK listed\r\n")
    assert h.session.owners == ["alice@acme.test", "sales@acme.test"]


def test_login_failure_releases_held_commands() -> None:
    h = Harness(processor=Processor({"alice": "alice@acme.test"}))
    h.to_client()
    h.send(b"a LOGIN alice wrong\r\nb NOOP\r\n")
    assert h.to_server() == b"a LOGIN alice wrong\r\n"
    h.server(b"a NO [AUTHENTICATIONFAILED] no\r\n")
    assert h.to_server() == b"b NOOP\r\n"
    assert h.session.user is None and h.session.login is None


def test_refused_append_literal_does_not_swallow_next_command() -> None:
    h = Harness()
    h.to_client()
    h.send(b"a APPEND Nowhere {10}\r\n")
    h.server(b"a NO [TRYCREATE] no such mailbox\r\n")
    assert h.to_client() == b"a NO [TRYCREATE] no such mailbox\r\n"
    h.to_server()
    h.send(b"b NOOP\r\n")
    assert h.to_server() == b"b NOOP\r\n"


def _logged_in(greeting: bytes = GREETING, processor: type[Processor] = Processor) -> Harness:
    h = Harness(greeting=greeting, processor=processor({"alice": "alice@acme.test"}))
    h.send(b"a LOGIN alice pw\r\n")
    h.server(b"a OK in\r\n")
    h.server(b'* LIST (\\Sent) "/" Sent\r\nsmp1 OK listed\r\n')
    h.to_client()
    h.to_server()
    return h


def test_append_mailbox_literal_naming_sent_is_collected_not_streamed() -> None:
    h = _logged_in()
    h.send(b"b APPEND {4}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"sent (\\Seen) {3}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"  # the proxy's own: collecting
    h.send(b"abc")
    assert h.to_server() == b""  # nothing reaches the server before encryption


def test_append_mailbox_literal_naming_other_folder_streams() -> None:
    h = _logged_in()
    h.send(b"b APPEND {5}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"INBOX {3}\r\n")
    assert h.to_server() == b'b APPEND "INBOX" {3}\r\n'
    assert h.to_client() == b""  # the server's continuation will be forwarded
    h.server(b"+ go\r\n")
    assert h.to_client() == b"+ go\r\n"
    h.send(b"abc\r\n")
    assert h.to_server() == b"abc\r\n"
    h.server(b"b OK appended\r\n")
    assert h.to_client() == b"b OK appended\r\n"


def test_refused_sync_literal_without_literal_plus_does_not_hang() -> None:
    h = Harness(greeting=b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    h.to_client()
    h.send(b"b LOGIN {5}\r\nalice pw\r\nc NOOP\r\n")
    assert h.to_server() == b"b LOGIN {5}\r\n"
    h.server(b"b NO refused\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\nb NO refused\r\n"
    assert h.to_server() == b"c NOOP\r\n"  # the literal is dropped, the session goes on


def test_service_stop_says_bye_and_waits_for_sessions() -> None:
    from twisted.internet.task import Clock

    from smimeproxy.imap import ImapService
    from smimeproxy.imap.metrics import ImapMetrics

    metrics = ImapMetrics()
    sessions: set[Any] = set()
    first = Harness(metrics=metrics, sessions=sessions)
    second = Harness(metrics=metrics, sessions=sessions)
    assert metrics.sessions.value() == 2
    clock = Clock()
    service = ImapService(clock, metrics, sessions)
    service.startService()
    stopped = service.stopService()
    for h in (first, second):
        assert h.to_client().endswith(b"* BYE server shutting down\r\n")
        assert h.client.disconnecting and h.up_transport.disconnecting
    assert not stopped.called
    first.session.connectionLost(None)
    assert not stopped.called
    clock.advance(10)  # the second never goes: aborted after the grace period
    second.session.connectionLost(None)
    assert stopped.called
    assert metrics.sessions.value() == 0 and not sessions


def test_reload_changes_folders_for_new_sessions_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from twisted.internet.testing import MemoryReactor

    from smimeproxy.config import load_config
    from smimeproxy.imap import make_service
    from smimeproxy.metrics import Registry

    (tmp_path / "master.key").write_bytes(b"x" * 32)
    text = (
        '[keystore]\nurl = "sqlite:s.db"\nmaster_key_file = "master.key"\n'
        '[imap]\nlisten = ["tcp:1143:interface=127.0.0.1"]\n'
        'upstream = "tcp:127.0.0.1:143"\nupstream_tls = "none"\nsent_folders = [%s]\n'
    )
    path = tmp_path / "c.toml"
    path.write_text(text % '"Sent"')
    registry = Registry()
    service = make_service(load_config(path), reactor=MemoryReactor(), registry=registry)
    factory = service.factories[0]  # type: ignore[attr-defined]
    old = factory.context
    path.write_text(text % '"Sent", "Outbox"')
    service.reload(load_config(path))  # type: ignore[attr-defined]
    assert old.sent_folders == ("Sent",)
    assert factory.context.sent_folders == ("Sent", "Outbox")
    assert factory.context.sessions is old.sessions  # one set: shutdown reaches all
    assert b"smimeproxy_imap_sessions 0" in registry.render()


class SealingProcessor(Processor):
    """Encrypts by wrapping: enough to see what goes upstream."""

    def seal_for(self, data: bytes, sender: str, recipients: list[str], sign: bool = True) -> Any:
        @dataclass
        class Sealed:
            data: bytes
            encrypted_to: tuple[str, ...]

        return Sealed(b"SEALED(" + data + b")", (sender,))


def test_refused_sent_append_without_literal_plus_answers_and_goes_on() -> None:
    h = Harness(
        greeting=b"* OK [CAPABILITY IMAP4rev1] hi\r\n",
        processor=SealingProcessor({"alice": "alice@acme.test"}),
    )
    h.send(b"a LOGIN alice pw\r\n")
    h.server(b"a OK in\r\n")
    h.server(b'* LIST (\\Sent) "/" Sent\r\nsmp1 OK listed\r\n')
    h.to_client()
    h.to_server()
    h.send(b"b APPEND Sent {3}\r\n")
    h.send(b"abc\r\nc NOOP\r\n")
    assert h.to_server() == b"b APPEND Sent {11}\r\n"  # sealed; waits for the server's +
    h.server(b"b NO [TRYCREATE] no such mailbox\r\n")
    assert h.to_client().endswith(b"b NO [TRYCREATE] no such mailbox\r\n")
    assert h.to_server() == b"c NOOP\r\n"  # the sealed literal is never sent


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [
                    b"b APPEND {4}\r\n",
                    b"Sent",
                    b"INBOX",
                    b" (\\Seen) {3}\r\n",
                    b"abc\r\n",
                    b"c UID FETCH 1:* (BODY.PEEK[])\r\n",
                    b"d APPEND Sent {3+}\r\nxyz\r\n",
                ]
            ),
        ),
        max_size=10,
    ),
    st.lists(
        st.sampled_from(
            [b"+ go\r\n", b"b NO no\r\n", b"b OK done\r\n", b"* 1 EXISTS\r\n", b"c OK x\r\n"]
        ),
        max_size=6,
    ),
)
def test_fuzz_logged_in_user_never_raises(client: list[bytes], server: list[bytes]) -> None:
    """The paths only a user with keys takes (literal mailbox names, intercepts), cut
    anywhere and answered anyhow: no exception escapes, and closing is clean."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        # a bug is logged at error level (smimeproxy.bugs.log_bug), a crash as a failure
        if "log_failure" in event or event.get("log_level", LogLevel.info) >= LogLevel.error:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = _logged_in(processor=SealingProcessor)
        for i, chunk in enumerate(client):
            h.send(chunk)
            if i < len(server):
                h.server(server[i])
        h.session.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, formatEvent(failures[0])


def test_idle_session_is_logged_out_and_traffic_keeps_it_open() -> None:
    """``[imap] idle_timeout``: silence on both sides for that long ends the session
    with ``* BYE`` (RFC 9051 5.4); a byte from either side restarts the clock."""
    clock = Clock()
    h = Harness(idle_timeout=60, call_later=clock.callLater)
    h.to_client()
    clock.advance(50)
    h.send(b"a NOOP\r\n")  # the client speaks
    clock.advance(50)
    h.server(b"a OK done\r\n")  # the server answers
    clock.advance(50)
    assert not h.client.disconnecting and not h.up_transport.disconnecting
    assert h.to_client() == b"a OK done\r\n"
    clock.advance(11)
    assert h.to_client() == b"* BYE autologout; idle for too long\r\n"
    assert h.client.disconnecting and h.up_transport.disconnecting
    assert clock.getDelayedCalls() == []


def _logged_in_and_selected(uidvalidity: int = 7) -> Harness:
    h = Harness(processor=Processor({"alice": "alice@acme.test"}))
    h.send(b"a LOGIN alice pw\r\n")
    h.server(b"a OK in\r\n")
    h.server(b"smp1 OK listed\r\n")
    h.send(b"b SELECT INBOX\r\n")
    h.server(b"* 2 EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\nb OK [READ-WRITE] done\r\n" % uidvalidity)
    h.to_client()
    h.to_server()
    return h


CT_QUERY = b" (UID BODY.PEEK[HEADER.FIELDS (CONTENT-TYPE)])\r\n"
PLAIN_CT = b"BODY[HEADER.FIELDS (CONTENT-TYPE)] {26}\r\nContent-Type: text/plain\r\n)\r\n"
SMIME_HEADER = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
SMIME_CT = b"BODY[HEADER.FIELDS (CONTENT-TYPE)] {%d}\r\n%s)\r\n" % (len(SMIME_HEADER), SMIME_HEADER)


def _classify(h: Harness, highest: int, smime: list[int], first: int = 1, tag: int = 2) -> None:
    """The proxy classifies the mailbox (UIDs ``first``..``highest``): the highest UID,
    then one SEARCH; the server answers that ``smime`` are S/MIME."""
    assert h.to_server() == b"smp%d UID FETCH * (UID)\r\n" % tag
    h.server(b"* %d FETCH (UID %d)\r\nsmp%d OK done\r\n" % (highest, highest, tag))
    assert h.to_server() == (
        b"smp%d UID SEARCH UID %d:%d HEADER Content-Type pkcs7-mime\r\n" % (tag + 1, first, highest)
    )
    found = b"".join(b" %d" % u for u in smime)
    h.server(b"* SEARCH" + found + b"\r\nsmp%d OK done\r\n" % (tag + 1))


def test_non_uid_fetch_without_smime_messages_costs_no_extra_round_trip() -> None:
    """The first non-UID FETCH classifies the mailbox alongside its own Content-Type
    query (one round trip); once no message is S/MIME, the next goes straight on, until
    new mail arrives."""
    h = _logged_in_and_selected()
    h.send(b"c FETCH 1:2 (BODY.PEEK[])\r\n")
    # both proxy commands leave at once (pipelined), the client's waits for their answers
    assert h.to_server() == b"smp2 UID FETCH 1:*" + CT_QUERY + b"smp3 FETCH 1:2" + CT_QUERY
    for seq in (1, 2):
        h.server(b"* %d FETCH (UID %d " % (seq, seq + 10) + PLAIN_CT)
    h.server(b"smp2 OK done\r\n")
    for seq in (1, 2):
        h.server(b"* %d FETCH (UID %d " % (seq, seq + 10) + PLAIN_CT)
    h.server(b"smp3 OK done\r\n")
    assert h.to_server() == b"c FETCH 1:2 (BODY.PEEK[])\r\n"
    assert h.to_client() == b""  # the proxy's own answers stay with the proxy
    h.server(b"* 1 FETCH (BODY[] {2}\r\nhi)\r\nc OK done\r\n")
    assert h.to_client() == b"* 1 FETCH (BODY[] {2}\r\nhi)\r\nc OK done\r\n"
    # classified, nothing S/MIME: forwarded at once (and pipelined)
    h.send(b"d FETCH 2 (BODY.PEEK[])\r\ne FETCH 1 (RFC822)\r\n")
    assert h.to_server() == b"d FETCH 2 (BODY.PEEK[])\r\ne FETCH 1 (RFC822)\r\n"
    h.server(b"d OK done\r\n* 3 EXISTS\r\ne OK done\r\n")
    # new mail: the next FETCH of content asks again (only the messages not classified)
    h.send(b"f FETCH 3 (BODY.PEEK[])\r\n")
    assert h.to_server() == b"smp4 UID FETCH 13:*" + CT_QUERY + b"smp5 FETCH 3" + CT_QUERY


def test_non_uid_fetch_in_a_classified_mailbox_asks_only_for_uids() -> None:
    h = _logged_in_and_selected()
    # message 12 is S/MIME but could not be opened before: the proxy answers it as stored
    h.session.undecryptable.add(("alice@acme.test", "INBOX", 7, 12))
    h.send(b"c UID FETCH 11:12 (FLAGS)\r\n")  # no content: forwarded, nothing classified
    assert h.to_server() == b"c UID FETCH 11:12 (FLAGS)\r\n"
    h.server(b"c OK done\r\n")
    h.send(b"d UID FETCH 12 (BODY.PEEK[])\r\n")  # classifies
    _classify(h, 12, [12])
    assert h.to_server() == b"d UID FETCH 12 (BODY.PEEK[])\r\n"
    h.server(b"d OK done\r\n")
    h.to_client()
    h.send(b"e FETCH 1 (BODY.PEEK[])\r\n")
    assert h.to_server() == b"smp4 FETCH 1 (UID)\r\n"
    h.server(b"* 1 FETCH (UID 11)\r\nsmp4 OK done\r\n")
    assert h.to_server() == b"e FETCH 1 (BODY.PEEK[])\r\n"  # message 1 is not S/MIME
    h.server(b"* 1 FETCH (BODY[] {2}\r\nhi)\r\ne OK done\r\n")
    assert h.to_client() == b"* 1 FETCH (BODY[] {2}\r\nhi)\r\ne OK done\r\n"
    # a UID the classification does not cover yet: the Content-Type query decides
    h.send(b"f FETCH 1:* (BODY.PEEK[])\r\n")
    assert h.to_server() == b"smp5 FETCH 1:* (UID)\r\n"
    h.server(b"* 1 FETCH (UID 11)\r\n* 2 FETCH (UID 12)\r\n* 3 FETCH (UID 13)\r\n")
    h.server(b"smp5 OK done\r\n")
    assert h.to_server() == b"smp6 FETCH 1:*" + CT_QUERY


def _with_cached_view() -> tuple[Harness, bytes]:
    from smimeproxy.imap.cache import DecryptedCache
    from smimeproxy.imap.views import MessageView

    cache = DecryptedCache(1 << 20)
    h = Harness(processor=Processor({"alice": "alice@acme.test"}), cache=cache)
    h.send(b"a LOGIN alice pw\r\n")
    h.server(b"a OK in\r\n")
    h.server(b"smp1 OK listed\r\n")
    h.send(b"b SELECT INBOX\r\n")
    h.server(b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\nb OK done\r\n")
    h.to_server()
    h.send(b"c UID FETCH 1:* (FLAGS BODY.PEEK[HEADER])\r\n")  # classifies: UID 2 is S/MIME
    decrypted = b"Subject: secret\r\n\r\nthe plaintext\r\n"
    cache.put(("alice@acme.test", "INBOX", 7, 2), MessageView(decrypted))
    _classify(h, 2, [2])
    h.server(b"* 1 FETCH (UID 1 FLAGS ())\r\n* 2 FETCH (UID 2 FLAGS ())\r\nc OK done\r\n")
    h.to_client()
    h.to_server()
    return h, decrypted


def test_cached_uid_fetch_goes_upstream_in_the_same_turn_and_holds_later_commands() -> None:
    h, decrypted = _with_cached_view()
    h.send(b"t UID FETCH 2 (BODY.PEEK[])\r\nu NOOP\r\n")
    # no ciphertext asked for; the size is what marks the server's answer as its own
    assert h.to_server() == b"t UID FETCH 2 (UID RFC822.SIZE)\r\n"
    h.server(b"* 2 FETCH (UID 2 RFC822.SIZE 999)\r\nt OK done\r\n")
    assert h.to_client() == (
        b"* 2 FETCH (UID 2 BODY[] {%d}\r\n%s)\r\nt OK done\r\n" % (len(decrypted), decrypted)
    )
    assert h.to_server() == b"u NOOP\r\n"  # held until the FETCH completed
    assert h.session.rewrite is None


def test_cached_uid_fetch_behind_another_command_answers_the_same() -> None:
    """With a command in flight the same FETCH takes the intercept path: same bytes."""
    h, decrypted = _with_cached_view()
    h.send(b"s NOOP\r\nt UID FETCH 2 (BODY.PEEK[])\r\n")
    assert h.to_server() == b"s NOOP\r\n"
    h.server(b"s OK done\r\n")
    assert h.to_server() == b"t UID FETCH 2 (UID RFC822.SIZE)\r\n"
    h.server(b"* 2 FETCH (UID 2 RFC822.SIZE 999)\r\nt OK done\r\n")
    assert h.to_client() == (
        b"s OK done\r\n* 2 FETCH (UID 2 BODY[] {%d}\r\n%s)\r\nt OK done\r\n"
        % (len(decrypted), decrypted)
    )


def test_search_intercept_sends_the_command_with_single_spaces() -> None:
    h = _logged_in_and_selected()
    h.send(b"s UID SEARCH BODY foo\r\n")
    assert h.to_server() == b"smp2 UID SEARCH HEADER Content-Type pkcs7-mime\r\n"
    h.server(b"* SEARCH\r\nsmp2 OK done\r\n")
    assert h.to_server() == b"s UID SEARCH BODY foo\r\n"


FLAGGED = b"* 2 FETCH (UID 2 FLAGS (\\Flagged))\r\n"  # another session flagged it
FLAGGED_SEEN = b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Seen))\r\n"
CIPHERTEXT = b"Content-Type: application/pkcs7-mime\r\n\r\nMIAGCSqG\r\n"


@pytest.mark.parametrize(
    ("command", "upstream", "answer"),
    [
        # cached, closed set: the server is asked only for its own items (and the size)
        (
            b"t UID FETCH 2 (BODY.PEEK[])\r\n",
            b"t UID FETCH 2 (UID RFC822.SIZE)\r\n",
            b"* 2 FETCH (UID 2 RFC822.SIZE 999)\r\n",
        ),
        # open-ended set: the client's command goes upstream unchanged
        (
            b"t UID FETCH 2:* (BODY.PEEK[])\r\n",
            b"t UID FETCH 2:* (BODY.PEEK[])\r\n",
            b"* 2 FETCH (UID 2 BODY[] {%d}\r\n%s)\r\n" % (len(CIPHERTEXT), CIPHERTEXT),
        ),
    ],
)
@pytest.mark.parametrize("order", ["before", "after", "both"])
def test_unsolicited_flags_update_of_a_rewritten_uid_passes_through_unchanged(
    command: bytes, upstream: bytes, answer: bytes, order: str
) -> None:
    """RFC 9051 7.5.2: the server may send ``* n FETCH (FLAGS ...)`` for a message at any
    time (Dovecot does, before the tagged reply, when another session changed it); it
    is not the FETCH's answer and gets no content, whichever comes first."""
    h, decrypted = _with_cached_view()
    h.send(command)
    assert h.to_server() == upstream
    before = FLAGGED if order in ("before", "both") else b""
    after = FLAGGED_SEEN if order in ("after", "both") else b""
    h.server(before + answer + after + b"t OK done\r\n")
    body = b"BODY[] {%d}\r\n%s" % (len(decrypted), decrypted)
    assert h.to_client() == (
        before + b"* 2 FETCH (UID 2 " + body + b")\r\n" + after + b"t OK done\r\n"
    )
    assert h.session.rewrite is None


@pytest.mark.parametrize("order", ["before", "after", "both"])
def test_unsolicited_flags_update_in_a_non_uid_fetch_passes_through_unchanged(
    order: str,
) -> None:
    """The same by sequence number: the update names the message only by number."""
    h, decrypted = _with_cached_view()
    h.send(b"t FETCH 2 (BODY.PEEK[])\r\n")
    assert h.to_server() == b"smp4 FETCH 2 (UID)\r\n"
    h.server(b"* 2 FETCH (UID 2)\r\nsmp4 OK done\r\n")
    assert h.to_server() == b"t FETCH 2 (BODY.PEEK[])\r\n"
    before = b"* 2 FETCH (FLAGS (\\Flagged))\r\n" if order in ("before", "both") else b""
    after = b"* 2 FETCH (FLAGS (\\Flagged \\Seen))\r\n" if order in ("after", "both") else b""
    answer = b"* 2 FETCH (BODY[] {%d}\r\n%s)\r\n" % (len(CIPHERTEXT), CIPHERTEXT)
    h.server(before + answer + after + b"t OK done\r\n")
    body = b"BODY[] {%d}\r\n%s" % (len(decrypted), decrypted)
    assert h.to_client() == before + b"* 2 FETCH (" + body + b")\r\n" + after + b"t OK done\r\n"


def test_unsolicited_flags_update_during_the_proxys_own_commands_reaches_the_client() -> None:
    """The proxy's own FETCH commands never ask for FLAGS: an update that arrives while
    they run is the client's (it was swallowed with their answers before)."""
    h, decrypted = _with_cached_view()
    h.send(b"t FETCH 2 (BODY.PEEK[])\r\n")
    assert h.to_server() == b"smp4 FETCH 2 (UID)\r\n"
    h.server(b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (UID 2)\r\n")
    h.server(b"* 2 FETCH (UID 2 FLAGS (\\Flagged))\r\nsmp4 OK done\r\n")
    assert h.to_client() == b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (UID 2 FLAGS (\\Flagged))\r\n"
    assert h.to_server() == b"t FETCH 2 (BODY.PEEK[])\r\n"
    h.server(b"* 2 FETCH (BODY[] {%d}\r\n%s)\r\nt OK done\r\n" % (len(CIPHERTEXT), CIPHERTEXT))
    body = b"BODY[] {%d}\r\n%s" % (len(decrypted), decrypted)
    assert h.to_client() == b"* 2 FETCH (" + body + b")\r\nt OK done\r\n"


def test_pipelined_classification_answered_out_of_order_still_classifies() -> None:
    """Dovecot runs the two pipelined Content-Type queries in parallel: every response
    comes first, then the non-UID one's tagged reply, then the UID one's.  Both ask for
    the same items, so the proxy reads their responses together."""
    h = _logged_in_and_selected()
    h.session.undecryptable.add(("alice@acme.test", "INBOX", 7, 12))  # no keys needed
    h.send(b"c FETCH 2 (BODY.PEEK[])\r\n")
    assert h.to_server() == b"smp2 UID FETCH 1:*" + CT_QUERY + b"smp3 FETCH 2" + CT_QUERY
    h.server(b"* 1 FETCH (UID 11 " + PLAIN_CT + b"* 2 FETCH (UID 12 " + SMIME_CT)
    h.server(b"* 2 FETCH (UID 12 " + SMIME_CT + b"smp3 OK done\r\nsmp2 OK done\r\n")
    known = h.session.classification()
    assert (known.smime, known.upto) == ({12}, 13)
    assert h.to_server() == b"c FETCH 2 (BODY.PEEK[])\r\n"
    assert h.to_client() == b""


class OpeningEngine:
    """Engine worker processes, as the session sees them: each stored message handed
    over is answered when the test says so."""

    def __init__(self) -> None:
        self.opening: list[tuple[bytes, Deferred[Any]]] = []

    def open_view(self, owners: list[str], data: bytes, warm: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.opening.append((data, d))
        return d


PLAIN_BS = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 1 NIL NIL NIL NIL)'
CIPHER_BS = (
    b'("application" "pkcs7-mime" ("smime-type" "enveloped-data") NIL NIL "base64" 8'
    b" NIL NIL NIL NIL)"
)


def _first_sync_while_opening(**options: Any) -> tuple[Harness, OpeningEngine, bytes]:
    """A first sync of UIDs 1-3 (2 is S/MIME) with the message still in the engine when
    the server answers the client's command; returns the server's answer."""
    engine = OpeningEngine()
    h = Harness(processor=Processor({"alice": "alice@acme.test"}), engine=engine, **options)
    h.send(b"a LOGIN alice pw\r\n")
    h.server(b"a OK in\r\n")
    h.server(b"smp1 OK listed\r\n")
    h.send(b"b SELECT INBOX\r\n")
    h.server(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\nb OK done\r\n")
    h.to_client()
    h.to_server()
    h.send(b"c UID FETCH 1:* (UID BODYSTRUCTURE)\r\nd NOOP\r\n")
    _classify(h, 3, [2])
    assert h.to_server() == b"smp4 UID FETCH 2 (UID BODY.PEEK[])\r\n"
    h.server(b"* 2 FETCH (UID 2 BODY[] {%d}\r\n%s)\r\n" % (len(CIPHERTEXT), CIPHERTEXT))
    assert [data for data, _ in engine.opening] == [CIPHERTEXT]
    h.server(b"smp4 OK done\r\n")
    # every ciphertext is here: the client's command goes on while it is being opened
    assert h.to_server() == b"c UID FETCH 1:* (UID BODYSTRUCTURE)\r\n"
    answer = b"".join(
        b"* %d FETCH (UID %d BODYSTRUCTURE %s)\r\n" % (n, n, CIPHER_BS if n == 2 else PLAIN_BS)
        for n in (1, 2, 3)
    )
    h.server(answer + b"c OK done\r\n")
    return h, engine, answer


def test_responses_after_one_still_being_opened_wait_for_it_in_order() -> None:
    from smimeproxy.imap.views import MessageView

    h, engine, _answer = _first_sync_while_opening()
    first = b"* 1 FETCH (UID 1 BODYSTRUCTURE %s)\r\n" % PLAIN_BS
    assert h.to_client() == first  # the rest waits behind message 2
    assert h.to_server() == b"d NOOP\r\n"  # the next command need not wait: its answer does
    h.server(b"d OK noop\r\n")
    assert h.to_client() == b""
    view = MessageView(b"Subject: secret\r\n\r\nhello\r\n")
    engine.opening[0][1].callback(view)
    assert h.to_client() == (
        b"* 2 FETCH (UID 2 BODYSTRUCTURE %s)\r\n" % view.bodystructure(True)
        + b"* 3 FETCH (UID 3 BODYSTRUCTURE %s)\r\n" % PLAIN_BS
        + b"c OK done\r\n"
        + b"d OK noop\r\n"
    )
    assert h.session.rewrite is None


def test_a_close_waits_for_responses_still_being_opened() -> None:
    """FETCH, then LOGOUT, and the server hangs up: the client still gets every
    response, in order, before the connection closes."""
    from smimeproxy.imap.views import MessageView

    h, engine, _answer = _first_sync_while_opening()
    h.to_client()
    h.to_server()
    h.server(b"d OK noop\r\n")
    h.send(b"e LOGOUT\r\n")
    assert h.to_server() == b"e LOGOUT\r\n"
    h.server(b"* BYE bye\r\ne OK done\r\n")
    h.up_transport.loseConnection()
    h.session.upstream_lost(None)
    assert not h.client.disconnecting
    engine.opening[0][1].callback(MessageView(b"Subject: s\r\n\r\nx\r\n"))
    out = h.to_client()
    assert out.startswith(b"* 2 FETCH (UID 2 BODYSTRUCTURE (")
    assert out.endswith(b"c OK done\r\nd OK noop\r\n* BYE bye\r\ne OK done\r\n")
    assert h.client.disconnecting


def test_a_message_that_cannot_be_opened_is_answered_as_stored_in_its_place() -> None:
    h, engine, answer = _first_sync_while_opening()
    h.to_client()
    engine.opening[0][1].callback(None)
    rest = answer.split(b"\r\n", 1)[1]
    assert h.to_client() == rest + b"c OK done\r\n"


def test_the_server_is_not_read_while_too_much_waits_behind_an_opening() -> None:
    from smimeproxy.imap.views import MessageView

    h, engine, _answer = _first_sync_while_opening(max_held=64)
    assert h.up_transport.producerState == "paused"
    engine.opening[0][1].callback(MessageView(b"Subject: s\r\n\r\nx\r\n"))
    assert h.up_transport.producerState == "producing"
    assert h.to_client().endswith(b"c OK done\r\n")


def test_logout_gets_the_servers_bye_and_nothing_after_its_ok() -> None:
    """RFC 3501 6.1.3: after LOGOUT's tagged OK the connection closes; the proxy adds no
    BYE of its own when the server gave one (it does when the server just vanishes)."""
    h = _logged_in_and_selected()
    h.to_client()
    h.send(b"z LOGOUT\r\n")
    assert h.to_server() == b"z LOGOUT\r\n"
    h.server(b"* BYE Logging out\r\nz OK Logout completed.\r\n")
    h.session.upstream_lost(None)
    assert h.to_client() == b"* BYE Logging out\r\nz OK Logout completed.\r\n"
    assert h.client.disconnecting
