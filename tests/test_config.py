"""The configuration file: what an operator writes, and what they are told when it is wrong."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

from smimeproxy.config import (
    SMTPConfig,
    default_config_text,
    load_config,
    parse_endpoint,
)
from smimeproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "smimeproxy.example.toml"

# Copied by hand from the contract section of DESIGN.md (not from the module), so that
# a change to the module's own copy cannot make this test pass on its own.
CONTRACT_BLOCK = """\
[keystore]
url = "sqlite:var/store.db"          # or "postgresql://user@host/db"
master_key_file = "var/master.key"

[smtp]
listen = ["tcp:10025:interface=127.0.0.1"]
next_hop = "tcp:127.0.0.1:10026"
local_domains = ["acme.test"]
authserv_id = "acme.test"

[imap]
listen = ["tcp:1143:interface=127.0.0.1"]
upstream = "tcp:127.0.0.1:143"
plaintext_login = true                # only for loopback tests and demos

[directory]
dns_listen = ["udp:5353:interface=127.0.0.1", "tcp:5353:interface=127.0.0.1"]
http_listen = ["tcp:8080:interface=127.0.0.1"]

[archive]
index_dir = "var/index"

[metrics]
listen = ["tcp:9108:interface=127.0.0.1"]   # Prometheus text at /metrics
"""

MINIMAL_SMTP = """
[smtp]
listen = ["tcp:10025:interface=127.0.0.1"]
next_hop = "tcp:127.0.0.1:10026"
local_domains = ["acme.test"]
"""


def write(tmp_path: Path, text: str, name: str = "smimeproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value


# -- what must load -------------------------------------------------------------------


def test_contract_example_loads_with_every_face_on(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT_BLOCK))
    assert config.keystore.sqlite_path == tmp_path / "var" / "store.db"
    assert config.keystore.url == f"sqlite:{tmp_path / 'var' / 'store.db'}"
    assert config.keystore.master_key_file == tmp_path / "var" / "master.key"
    assert config.smtp is not None
    assert config.smtp.listen == ("tcp:10025:interface=127.0.0.1",)
    assert config.smtp.next_hop == "tcp:127.0.0.1:10026"
    assert config.smtp.local_domains == ("acme.test",)
    assert config.smtp.authserv_id == "acme.test"
    assert config.imap is not None
    assert config.imap.upstream == "tcp:127.0.0.1:143"
    assert config.imap.plaintext_login is True
    assert config.directory is not None
    assert config.directory.dns_listen == (
        "udp:5353:interface=127.0.0.1",
        "tcp:5353:interface=127.0.0.1",
    )
    assert config.directory.http_listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.directory.domains == ("acme.test",)  # from [smtp] local_domains
    assert config.archive is not None
    assert config.archive.index_dir == tmp_path / "var" / "index"
    assert config.metrics is not None
    assert config.metrics.listen == ("tcp:9108:interface=127.0.0.1",)
    # the engine's Authentication-Results name follows the gateway's
    assert config.smime.authserv_id == "acme.test"


def test_contract_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT_BLOCK))
    smtp, imap = config.smtp, config.imap
    assert smtp is not None and imap is not None
    assert smtp.max_message_size == 50 * 1024 * 1024
    assert smtp.outbound_policy == "encrypt-if-possible"
    assert smtp.inbound_storage == "deliver-decrypted"
    assert smtp.next_hop_starttls == "opportunistic"
    assert smtp.force_encrypt_keyword is None
    assert smtp.tls_certificate is None and smtp.tls_key is None
    assert imap.upstream_tls == "opportunistic"
    assert "Sent" in imap.sent_folders
    assert config.smime.revocation == "soft-fail"
    assert config.smime.signing_digest == "sha256"
    assert config.smime.footer is True


def test_only_keystore_turns_every_face_off(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[keystore]\nurl = "sqlite:s.db"\nmaster_key_file = "m.key"\n')
    )
    assert (config.smtp, config.imap, config.directory, config.archive, config.metrics) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert config.keystore.sqlite_path == tmp_path / "s.db"
    assert config.smime.cipher == "auto"
    assert config.smime.trust_anchors == ()


def test_empty_file_means_an_embedded_store_next_to_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.keystore.sqlite_path == tmp_path / "var" / "store.db"
    assert config.keystore.master_key_file == tmp_path / "var" / "master.key"
    assert config.smtp is None


def test_postgresql_url_is_kept(tmp_path: Path) -> None:
    text = '[keystore]\nurl = "postgresql://smime@db.acme.test/store"\nmaster_key_env = "SMK"\n'
    config = load_config(write(tmp_path, text))
    assert config.keystore.url == "postgresql://smime@db.acme.test/store"
    assert config.keystore.sqlite_path is None
    assert config.keystore.master_key_env == "SMK"
    assert config.keystore.master_key_file is None


def test_relative_paths_are_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "smimeproxy"
    etc.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = (
        '[keystore]\nurl = "sqlite:../../db/store.db"\npassphrase_file = "secret/pass"\n'
        '[smime]\ntrust_anchors = ["ca/root.pem", "/abs/other.pem"]\ncrls = ["crl.pem"]\n'
        + MINIMAL_SMTP
        + 'tls_certificate = "tls/cert.pem"\ntls_key = "tls/key.pem"\n'
        '[imap]\nlisten = ["ssl:993:privateKey=tls/key.pem:certKey=tls/cert.pem"]\n'
        'upstream = "unix:run/imap.sock"\n'
        '[archive]\nindex_dir = "idx"\n'
        '[[archive.sources]]\nkind = "mbox"\npath = "mail/alice.mbox"\nowner = "alice@acme.test"\n'
    )
    config = load_config(Path(os.path.relpath(write(etc, text), elsewhere)))
    assert config.path == etc / "smimeproxy.toml"
    assert config.keystore.sqlite_path == etc / "../../db/store.db"
    assert config.keystore.passphrase_file == etc / "secret" / "pass"
    assert config.keystore.master_key_file is None
    assert config.smime.trust_anchors == (etc / "ca" / "root.pem", Path("/abs/other.pem"))
    assert config.smime.crls == (etc / "crl.pem",)
    assert config.smtp is not None and config.imap is not None and config.archive is not None
    assert config.smtp.tls_certificate == etc / "tls" / "cert.pem"
    assert config.smtp.tls_key == etc / "tls" / "key.pem"
    assert config.archive.index_dir == etc / "idx"
    assert config.archive.sources[0].path == etc / "mail" / "alice.mbox"
    # file parameters inside endpoint strings, too
    assert config.imap.listen == (
        f"ssl:993:privateKey={etc}/tls/key.pem:certKey={etc}/tls/cert.pem",
    )
    assert config.imap.upstream == f"unix:{etc}/run/imap.sock"
    assert config.imap.upstream_tls == "opportunistic"


def test_resolved_endpoints_are_what_twisted_understands(tmp_path: Path) -> None:
    base = tmp_path / "dir:with=odd"
    server = parse_endpoint("unix:sock/s:mode=600", "server", base_dir=base)
    assert server.params["address"] == f"{base}/sock/s"
    endpoint = serverFromString(MemoryReactor(), server.description)
    assert endpoint._address == f"{base}/sock/s"  # type: ignore[attr-defined]
    assert endpoint._mode == 0o600  # type: ignore[attr-defined]
    client = parse_endpoint("tcp:mail.acme.test:25:timeout=7", "client", base_dir=base)
    assert client.description == "tcp:mail.acme.test:25:timeout=7"
    tcp = clientFromString(MemoryReactor(), client.description)
    assert (tcp._host, tcp._port, tcp._timeout) == ("mail.acme.test", 25, 7)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("role", "description"),
    [
        ("server", "tcp:0"),
        ("server", "tcp6:993:interface=\\:\\:1"),
        ("server", "unix:/run/smimeproxy.sock:mode=660:lockfile=0"),
        ("client", "tls:imap.acme.test:993"),
        ("client", "ssl:host=imap.acme.test:port=993"),
        ("dns", "udp:53:interface=0.0.0.0"),
        ("dns", "tcp:53"),
    ],
)
def test_endpoint_forms_accepted(role: str, description: str) -> None:
    assert parse_endpoint(description, role).description == description  # type: ignore[arg-type]


def test_example_file_loads_with_every_face_and_option(tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    assert None not in (config.smtp, config.imap, config.directory, config.archive)
    assert config.metrics is not None
    assert config.directory is not None and config.archive is not None
    assert config.directory.push is not None and config.directory.lookup is not None
    assert config.directory.lookup.require_dnssec is True
    assert config.directory.push.tsig_key_file == ROOT / "secrets" / "tsig.key"
    assert [s.kind for s in config.archive.sources] == ["maildir", "imap"]
    assert config.archive.schedule is None
    # its values are the built-in defaults: the same file without the optional keys
    # loads to the same smtp/imap/smime objects
    bare = load_config(write(tmp_path, CONTRACT_BLOCK.replace("plaintext_login = true", "")))
    assert bare.smtp is not None and config.smtp is not None
    assert dataclasses.replace(bare.smtp, authserv_id="x") == dataclasses.replace(
        config.smtp, authserv_id="x"
    )
    assert dataclasses.replace(bare.imap, listen=()) == dataclasses.replace(  # type: ignore[arg-type]
        config.imap,  # type: ignore[arg-type]
        listen=(),
    )
    assert dataclasses.replace(bare.smime, authserv_id="x") == dataclasses.replace(
        config.smime, authserv_id="x"
    )


DERIVED_FIELDS = {"sqlite_path"}


@pytest.mark.parametrize(
    ("section", "cls"),
    [
        ("keystore", "KeystoreConfig"),
        ("smime", "SMIMEConfig"),
        ("smtp", "SMTPConfig"),
        ("imap", "IMAPConfig"),
        ("directory", "DirectoryConfig"),
        ("archive", "ArchiveConfig"),
        ("metrics", "MetricsConfig"),
        ("directory.push", "DNSPushConfig"),
        ("directory.lookup", "DNSLookupConfig"),
    ],
)
def test_example_file_documents_every_key(section: str, cls: str) -> None:
    import smimeproxy.config as module

    table = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for part in section.split("."):
        table = table[part]
    fields = {f.name for f in dataclasses.fields(getattr(module, cls))} - DERIVED_FIELDS
    assert fields <= set(table), f"undocumented in [{section}]: {sorted(fields - set(table))}"


def test_default_config_text_round_trips(tmp_path: Path) -> None:
    text = default_config_text(tmp_path)
    assert str(tmp_path) in text.split("[keystore]")[0]  # named in the header comment
    assert tomllib.loads(text) == tomllib.loads(CONTRACT_BLOCK)
    config = load_config(write(tmp_path, text))
    contract = load_config(write(tmp_path, CONTRACT_BLOCK, name="contract.toml"))
    assert config == dataclasses.replace(contract, path=config.path)
    assert config.keystore.master_key_file == tmp_path / "var" / "master.key"


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL_SMTP + '[smtp.recipient_policy]\n"b.test" = "sign-only"\n')
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.smtp = None  # type: ignore[misc]
    assert config.smtp is not None
    with pytest.raises(TypeError):
        config.smtp.recipient_policy["c.test"] = "pass-through"  # type: ignore[index]


# -- policy lookups -------------------------------------------------------------------


def smtp_of(tmp_path: Path, extra: str) -> SMTPConfig:
    config = load_config(write(tmp_path, MINIMAL_SMTP + extra))
    assert config.smtp is not None
    return config.smtp


def test_policy_overrides_by_address_domain_and_sender(tmp_path: Path) -> None:
    smtp = smtp_of(
        tmp_path,
        'force_encrypt_keyword = "[secure]"\n'
        "[smtp.recipient_policy]\n"
        '"Partner.test" = "must-encrypt"\n'
        '"press@partner.test" = "sign-only"\n'
        '"list.test" = "pass-through"\n'
        "[smtp.sender_policy]\n"
        '"legal@acme.test" = "must-encrypt"\n',
    )
    assert smtp.force_encrypt_keyword == "[secure]"
    assert smtp.policy_for("alice@acme.test", "bob@other.test") == "encrypt-if-possible"
    assert smtp.policy_for("alice@acme.test", "carol@PARTNER.test") == "must-encrypt"
    assert smtp.policy_for("alice@acme.test", "press@partner.test") == "sign-only"
    assert smtp.policy_for("alice@acme.test", "x@list.test") == "pass-through"
    # the stricter of sender and recipient overrides
    assert smtp.policy_for("legal@acme.test", "x@list.test") == "must-encrypt"


def test_inbound_storage_per_domain(tmp_path: Path) -> None:
    smtp = smtp_of(
        tmp_path,
        'inbound_storage = "encrypt-at-rest"\n'
        '[smtp.inbound_storage_by_domain]\n"Legal.acme.test" = "keep-encrypted"\n',
    )
    assert smtp.storage_for("legal.acme.test") == "keep-encrypted"
    assert smtp.storage_for("acme.test") == "encrypt-at-rest"


def test_authserv_id_falls_back_to_the_first_local_domain(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL_SMTP))
    assert config.smtp is not None
    assert config.smime.authserv_id == config.smtp.authserv_id == "acme.test"
    config = load_config(write(tmp_path, '[smime]\nauthserv_id = "mx.acme.test"\n' + MINIMAL_SMTP))
    assert config.smtp is not None
    assert config.smime.authserv_id == config.smtp.authserv_id == "mx.acme.test"


def test_schedule_durations(tmp_path: Path) -> None:
    for value, seconds in (('"2h"', 7200), ('"30m"', 1800), ("900", 900), ('"off"', None)):
        config = load_config(write(tmp_path, f'[archive]\nindex_dir = "i"\nschedule = {value}\n'))
        assert config.archive is not None and config.archive.schedule == seconds


# -- every error names the key and the file ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        # missing required key
        (
            MINIMAL_SMTP.replace('next_hop = "tcp:127.0.0.1:10026"\n', ""),
            "smtp.next_hop",
            "required",
        ),
        ('[archive]\nschedule = "1h"\n', "archive.index_dir", "required"),
        ("[metrics]\n", "metrics.listen", "required"),
        # wrong types
        (
            MINIMAL_SMTP.replace('["tcp:10025:interface=127.0.0.1"]', '"tcp:10025"'),
            "smtp.listen",
            "list of strings",
        ),
        (MINIMAL_SMTP + "max_recipients = true\n", "smtp.max_recipients", "integer"),
        (MINIMAL_SMTP + 'max_message_size = "50MB"\n', "smtp.max_message_size", "integer"),
        (
            '[imap]\nlisten = []\nupstream = "tcp:h:143"\nplaintext_login = "yes"\n',
            "imap.plaintext_login",
            "true or false",
        ),
        ("smtp = 1\n", "smtp", "table"),
        (
            '[imap]\nlisten=[]\nupstream="tcp:h:1"\n[imap.delegation]\n"a@x.test" = "b@x.test"\n',
            "imap.delegation.a@x.test",
            "list of addresses",
        ),
        # unknown key / section: the allowed ones are listed
        (MINIMAL_SMTP + 'nexthop = "tcp:h:25"\n', "smtp.nexthop", "next_hop"),
        ("[smpt]\nlisten = []\n", "smpt", "smtp"),
        ('[directory]\n[directory.pushh]\nserver = "x"\n', "directory.pushh", "push"),
        (
            '[archive]\nindex_dir = "i"\n[[archive.sources]]\nkind = "mbox"\n'
            'path = "p"\nowner = "o@x"\nfolder = "f"\n',
            "archive.sources[0].folder",
            "owner",
        ),
        # bad endpoint strings
        (
            MINIMAL_SMTP.replace("tcp:127.0.0.1:10026", "tcp:127.0.0.1"),
            "smtp.next_hop",
            "needs port",
        ),
        (MINIMAL_SMTP.replace("tcp:10025:", "udp:10025:"), "smtp.listen", "'udp'"),
        (MINIMAL_SMTP.replace("tcp:10025:", "tcp:70000:"), "smtp.listen", "port number"),
        (MINIMAL_SMTP.replace("interface=", "iface="), "smtp.listen", "unknown parameter 'iface'"),
        ('[metrics]\nlisten = ["ssl:9108"]\n', "metrics.listen", "privateKey"),
        # bad enum values: the allowed ones are listed
        (MINIMAL_SMTP + 'outbound_policy = "encrypt"\n', "smtp.outbound_policy", "must-encrypt"),
        (
            MINIMAL_SMTP + '[smtp.recipient_policy]\n"b.test" = "never"\n',
            "smtp.recipient_policy.b.test",
            "sign-only",
        ),
        ('[smime]\nrevocation = "hard-fail"\n', "smime.revocation", "soft-fail"),
        ("[directory]\nsmimea_usage = 4\n", "directory.smimea_usage", "between 0 and 3"),
        # contradictions
        (MINIMAL_SMTP + 'tls_certificate = "c.pem"\n', "smtp.tls_key", "together"),
        (
            '[keystore]\nmaster_key_file = "k"\npassphrase_file = "p"\n',
            "keystore.passphrase_file",
            "only one",
        ),
        (
            '[imap]\nlisten=[]\nupstream = "tcp:h:993"\nupstream_tls = "implicit"\n',
            "imap.upstream_tls",
            "tls:",
        ),
        ('[keystore]\nurl = "mysql://h/db"\n', "keystore.url", "postgresql://"),
        (
            '[keystore]\nmaster_key_env = "NOT A NAME"\n',
            "keystore.master_key_env",
            "environment variable",
        ),
        ('[directory]\ndns_listen = ["udp:53"]\n', "directory.domains", "domains"),
    ],
)
def test_error_names_key_and_file(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert repr(key) in str(error)
    assert words in str(error)


SECRET = "c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw"


@pytest.mark.parametrize(
    ("text", "key", "advice"),
    [
        (f'[keystore]\nmaster_key = "{SECRET}"\n', "keystore.master_key", "master_key_file"),
        (f'[keystore]\npassphrase = "{SECRET}"\n', "keystore.passphrase", "passphrase_env"),
        (MINIMAL_SMTP + f'password = "{SECRET}"\n', "smtp.password", "no secret belongs"),
        (
            f'[keystore]\nurl = "postgresql://u:{SECRET}@h/db"\n',
            "keystore.url",
            "database_password_file",
        ),
        (
            f'[keystore]\nurl = "postgresql://u@h/db?password={SECRET}"\n',
            "keystore.url",
            "database_password_file",
        ),
        (
            f'[directory]\n[directory.push]\nserver = "h"\ntsig_key_file = "k"\n'
            f'tsig_secret = "{SECRET}"\n',
            "directory.push.tsig_secret",
            "tsig_key_file",
        ),
        (
            f'[archive]\nindex_dir = "i"\n[[archive.sources]]\nkind = "imap"\n'
            f'upstream = "tcp:h:143"\nmaster_user = "m"\nmaster_password = "{SECRET}"\n',
            "archive.sources[0].master_password",
            "master_password_file",
        ),
    ],
)
def test_inline_secret_is_refused_without_echoing_it(
    tmp_path: Path, text: str, key: str, advice: str
) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key
    assert "inline" in str(error)
    assert advice in str(error)
    assert SECRET not in str(error)


def test_unparsable_toml_names_the_line(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, '[keystore]\nurl = "sqlite:x.db"\nmaster_key_file = var/master.key\n'
    )
    assert error.key is None
    assert "line 3" in str(error)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.path == str(tmp_path / "absent.toml")


@settings(max_examples=300, deadline=None)
@given(
    description=st.text(alphabet=st.sampled_from("tcpslunixd6:=\\/.0123456789²ab "), max_size=40),
    role=st.sampled_from(["server", "client", "dns"]),
)
def test_any_endpoint_string_is_accepted_or_a_config_error(description: str, role: str) -> None:
    try:
        endpoint = parse_endpoint(description, role, base_dir=Path("/etc/smimeproxy"))  # type: ignore[arg-type]
    except ConfigError:
        return
    assert endpoint.type in ("tcp", "tcp6", "ssl", "tls", "unix", "udp")


def test_delegation_keys_compare_like_store_addresses(tmp_path: Path) -> None:
    """The IMAP session looks delegation up by the user's lower-case primary address."""
    config = load_config(
        write(
            tmp_path,
            '[imap]\nlisten = []\nupstream = "tcp:h:143"\n'
            '[imap.delegation]\n"Alice@ACME.test" = [" Sales@Acme.test"]\n',
        )
    )
    assert config.imap is not None
    assert dict(config.imap.delegation) == {"alice@acme.test": ("sales@acme.test",)}
