"""The configuration file: one TOML file read once at start into frozen, typed objects.

Why a module of its own: every face and every command reads the same file, and an
operator's typo must stop the start with a message that names the key and the file,
not surface an hour later as an odd behaviour. So everything is checked here, once:
unknown sections and keys are errors (the message lists the allowed ones), types are
checked, enumerations are checked, endpoint strings are parsed with Twisted's grammar
(by :mod:`smimeproxy.endpoints`, re-exported here), relative paths are resolved
against the directory of the file, and secrets written inline are refused (they belong
in a file or an environment variable).

The key names are a public interface (see the contract in DESIGN.md): add freely,
rename never. ``smimeproxy.example.toml`` documents every key with its default.

What is *not* checked here: that files exist or are readable (``smimeproxy doctor`` and
the faces do that when they open them: ``init`` must be able to load a config whose key
file does not exist yet), that endpoints can be bound or reached, or that a
certificate suits its purpose.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, cast

from smimeproxy.endpoints import Endpoint, EndpointRole, parse_endpoint
from smimeproxy.errors import ConfigError

__all__ = [
    "ArchiveConfig",
    "ArchiveSource",
    "Config",
    "DNSLookupConfig",
    "DNSPushConfig",
    "DirectoryConfig",
    "Endpoint",
    "IMAPConfig",
    "KeystoreConfig",
    "MetricsConfig",
    "SMIMEConfig",
    "SMTPConfig",
    "default_config_text",
    "load_config",
    "parse_endpoint",
]

# -- enumerations (the strings are the TOML values) ----------------------------------

#: What the gateway does with outbound mail (issue 4). ``encrypt-if-possible`` signs and
#: encrypts when every recipient's certificate is known, signs otherwise.
OutboundPolicy = Literal["encrypt-if-possible", "must-encrypt", "sign-only", "pass-through"]
#: strictest first
OUTBOUND_POLICIES: tuple[str, ...] = (
    "must-encrypt",
    "encrypt-if-possible",
    "sign-only",
    "pass-through",
)
#: How inbound mail is stored for a local domain (issue 4).
InboundStorage = Literal["deliver-decrypted", "keep-encrypted", "encrypt-at-rest"]
INBOUND_STORAGE_MODES: tuple[str, ...] = ("deliver-decrypted", "keep-encrypted", "encrypt-at-rest")
StartTLSPolicy = Literal["require", "opportunistic"]
STARTTLS_POLICIES: tuple[str, ...] = ("require", "opportunistic")
#: ``implicit`` needs a ``tls:``/``ssl:`` upstream; the others a ``tcp:``/``unix:`` one.
UpstreamTLS = Literal["implicit", "starttls", "opportunistic", "none"]
UPSTREAM_TLS_MODES: tuple[str, ...] = ("implicit", "starttls", "opportunistic", "none")
#: What "revocation status unknown" means for a signer: a failure, a flagged pass, or
#: not checked at all.
RevocationPolicy = Literal["require", "soft-fail", "off"]
REVOCATION_POLICIES: tuple[str, ...] = ("require", "soft-fail", "off")
#: ``auto``: RFC 8551 section 2.7, AES-GCM (AuthEnvelopedData, RFC 5083/5084) when every
#: recipient advertised it in SMIMECapabilities, else AES-256-CBC (EnvelopedData).
Cipher = Literal["auto", "aes256-gcm", "aes128-gcm", "aes256-cbc", "aes128-cbc"]
CIPHERS: tuple[str, ...] = ("auto", "aes256-gcm", "aes128-gcm", "aes256-cbc", "aes128-cbc")
#: RFC 8551 section 2.1: SHA-256 MUST, SHA-512 SHOULD.
SigningDigest = Literal["sha256", "sha384", "sha512"]
SIGNING_DIGESTS: tuple[str, ...] = ("sha256", "sha384", "sha512")
#: TSIG algorithm names, RFC 8945 section 6 (HMAC-MD5 and HMAC-SHA1 deliberately left out).
TSIG_ALGORITHMS: tuple[str, ...] = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224")
ArchiveSourceKind = Literal["imap", "maildir", "mbox"]
ARCHIVE_SOURCE_KINDS: tuple[str, ...] = ("imap", "maildir", "mbox")

#: 50 MiB: a 30 MB attachment grows by a third in base64 (issue 4 tests one).
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
#: RFC 5321 section 4.5.3.1.8 asks for at least 100; Postfix accepts 1000 by default.
DEFAULT_MAX_RECIPIENTS = 1000
#: upper bound of [smtp] and [imap] workers: more processes than this only add memory
MAX_WORKERS = 64
#: RFC 5321 section 4.5.3.2.7: a server SHOULD wait at least 5 minutes for a command.
DEFAULT_SMTP_IDLE_TIMEOUT = 300
#: RFC 5321 section 4.5.3.2.6: the client waits 10 minutes for the reply to end-of-data.
DEFAULT_NEXT_HOP_TIMEOUT = 600
#: RFC 9051 section 5.4: an inactivity autologout timer of at least 30 minutes.
DEFAULT_IMAP_IDLE_TIMEOUT = 1800
DEFAULT_IMAP_CACHE_BYTES = 64 * 1024 * 1024
#: RFC 8162 section 2 with RFC 7218 names: DANE-EE(3), Cert(0), Full(0).
DEFAULT_SMIMEA = (3, 0, 0)

_T = TypeVar("_T")
_V = TypeVar("_V")

# -- the typed configuration ----------------------------------------------------------


@dataclass(frozen=True)
class KeystoreConfig:
    """Where the key store lives and where its master secret comes from.

    Exactly one master-secret source is set; without any, ``master_key_file`` defaults
    to ``var/master.key`` next to the config file.
    """

    url: str  # "sqlite:/absolute/path" (resolved) or "postgresql://user@host/db"
    sqlite_path: Path | None
    master_key_file: Path | None
    master_key_env: str | None
    passphrase_file: Path | None
    passphrase_env: str | None
    database_password_file: Path | None
    pkcs11_module: Path | None
    pkcs11_token_label: str | None
    pkcs11_pin_file: Path | None


@dataclass(frozen=True)
class SMIMEConfig:
    """Engine settings shared by every face (always present, all defaulted)."""

    authserv_id: str
    revocation: RevocationPolicy
    footer: bool
    header_protection: bool
    cipher: Cipher
    signing_digest: SigningDigest
    trust_anchors: tuple[Path, ...]
    intermediates: tuple[Path, ...]
    crls: tuple[Path, ...]


@dataclass(frozen=True)
class SMTPConfig:
    """The SMTP gateway (issue 4). Maps are keyed by lower-case address or domain."""

    listen: tuple[str, ...]
    next_hop: str
    local_domains: tuple[str, ...]
    authserv_id: str
    max_message_size: int
    max_recipients: int
    idle_timeout: int
    next_hop_timeout: int
    tls_certificate: Path | None
    tls_key: Path | None
    next_hop_starttls: StartTLSPolicy
    next_hop_tls_hostname: str | None
    next_hop_ca_file: Path | None
    inbound_storage: InboundStorage
    inbound_storage_by_domain: Mapping[str, InboundStorage]
    outbound_policy: OutboundPolicy
    internal_policy: OutboundPolicy
    recipient_policy: Mapping[str, OutboundPolicy]
    sender_policy: Mapping[str, OutboundPolicy]
    force_encrypt_keyword: str | None
    #: worker processes running the engine (0: the gateway's own thread pool)
    workers: int = 0
    #: listeners where AUTH is required before MAIL (mail clients submit here); () = none
    submission_listen: tuple[str, ...] = ()
    #: Dovecot's auth-client socket (a client endpoint); set whenever submission_listen is
    auth_dovecot: str | None = None
    #: offer AUTH on submission listeners before STARTTLS (a trusted loopback listener only)
    submission_plaintext: bool = False

    def policy_for(self, sender: str, recipient: str) -> OutboundPolicy:
        """The outbound policy for one recipient of a message from ``sender``.

        An override for the address wins over one for its domain; when both the sender
        and the recipient have an override, the stricter applies (must-encrypt >
        encrypt-if-possible > sign-only > pass-through); without any, ``outbound_policy``.
        Not considered here: the subject keyword and whether a certificate exists.
        """
        found = [
            p
            for table, address in ((self.recipient_policy, recipient), (self.sender_policy, sender))
            if (p := _lookup(table, address)) is not None
        ]
        if not found:
            return self.outbound_policy
        return min(found, key=OUTBOUND_POLICIES.index)

    def storage_for(self, domain: str) -> InboundStorage:
        """How inbound mail for a local ``domain`` is stored."""
        return self.inbound_storage_by_domain.get(domain.lower(), self.inbound_storage)


def _lookup(table: Mapping[str, _V], address: str) -> _V | None:
    address = address.lower()
    if address in table:
        return table[address]
    return table.get(address.rpartition("@")[2])


@dataclass(frozen=True)
class IMAPConfig:
    """The IMAP proxy (issue 5)."""

    listen: tuple[str, ...]
    upstream: str
    plaintext_login: bool
    tls_certificate: Path | None
    tls_key: Path | None
    upstream_tls: UpstreamTLS
    upstream_tls_hostname: str | None
    upstream_ca_file: Path | None
    sent_folders: tuple[str, ...]
    encrypt_drafts: bool
    drafts_folders: tuple[str, ...]
    cache_bytes: int
    idle_timeout: int
    #: login address -> addresses whose keys that login may also use
    delegation: Mapping[str, tuple[str, ...]]
    #: worker processes decrypting stored messages (0: the proxy's own thread pool)
    workers: int = 0


@dataclass(frozen=True)
class DNSPushConfig:
    """RFC 2136 dynamic updates, signed with TSIG (RFC 8945), to the primary server."""

    server: str
    port: int
    tsig_key_file: Path
    tsig_algorithm: str


@dataclass(frozen=True)
class DNSLookupConfig:
    """Outbound SMIMEA lookups through one resolver."""

    resolver: str
    port: int
    require_dnssec: bool
    timeout: int


@dataclass(frozen=True)
class DirectoryConfig:
    """Certificate publication (issue 7); an empty listener list leaves that server off."""

    dns_listen: tuple[str, ...]
    http_listen: tuple[str, ...]
    ldap_listen: tuple[str, ...]
    domains: tuple[str, ...]
    ttl: int
    smimea_usage: int
    smimea_selector: int
    smimea_matching_type: int
    push: DNSPushConfig | None
    lookup: DNSLookupConfig | None


@dataclass(frozen=True)
class ArchiveSource:
    """One mailbox source of the archive: a Maildir, an mbox file or the IMAP server."""

    kind: ArchiveSourceKind
    path: Path | None
    owner: str | None
    upstream: str | None
    master_user: str | None
    master_password_file: Path | None


@dataclass(frozen=True)
class ArchiveConfig:
    """The archive (issue 6). ``schedule`` is seconds between runs, ``None`` for none."""

    index_dir: Path
    sources: tuple[ArchiveSource, ...]
    schedule: int | None


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus text endpoint (``/metrics``)."""

    listen: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    """The whole file. A face whose section is absent is ``None``: that face is off."""

    path: Path
    keystore: KeystoreConfig
    smime: SMIMEConfig
    smtp: SMTPConfig | None
    imap: IMAPConfig | None
    directory: DirectoryConfig | None
    archive: ArchiveConfig | None
    metrics: MetricsConfig | None
    #: the file's TOML as parsed, for :func:`load_config` in another process (an engine
    #: worker) to build exactly this configuration, whatever the file holds by then
    document: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


# -- reading one table ----------------------------------------------------------------

_REQUIRED: Any = object()
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "pin", "pw"})
_SECRET_NAMES = frozenset({"master_key", "tsig_key", "private_key", "key_material"})
#: the keys through which each section takes its secrets (by file or environment)
_SECRET_HOLDERS = {
    "keystore": (
        "master_key_file",
        "master_key_env",
        "passphrase_file",
        "passphrase_env",
        "database_password_file",
        "pkcs11_pin_file",
    ),
    "directory.push": ("tsig_key_file",),
    "archive.sources": ("master_password_file",),
}
_DURATION = re.compile(r"\s*(\d+)\s*([smhd]?)\s*\Z")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _looks_secret(key: str) -> bool:
    name = key.lower()
    if name.endswith(("_file", "_env", "_dir")):
        return False
    return name in _SECRET_NAMES or any(w in _SECRET_WORDS for w in name.split("_"))


class _Table:
    """Typed access to one TOML table; remembers what it read to reject the rest."""

    def __init__(
        self, data: Mapping[str, Any], name: str, source: Path, user_keys: bool = False
    ) -> None:
        self.data = data
        self.name = name
        self.source = source
        self.base = source.parent
        self.known: list[str] = []
        # No key of ours looks like a secret, so refuse those first: "is required" for
        # the *_file key would hide the real mistake. Tables keyed by addresses are not
        # schema, so they are not checked.
        for key in () if user_keys else data:
            if _looks_secret(key):
                holders = _SECRET_HOLDERS.get(re.sub(r"\[\d+\]$", "", name), ())
                hint = (
                    f"name a file or an environment variable with {', '.join(holders)}"
                    if holders
                    else f"no secret belongs in [{name}]"
                )
                raise self.error(key, f"secrets are never written inline: {hint}")

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(
            message, key=self.key(key) if key else self.name or None, path=str(self.source)
        )

    def raw(self, key: str, default: Any) -> Any:
        self.known.append(key)
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise self.error(key, "is required")
        return default

    def typed(self, key: str, kind: type[_T], what: str, default: Any = _REQUIRED) -> _T:
        value = self.raw(key, default)
        if value is not default and (
            not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        ):
            raise self.error(key, f"must be {what}, not {_describe(value)}")
        return cast(_T, value)

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        return self.typed(key, str, "a string", default)

    def optional_string(self, key: str) -> str | None:
        return self.string(key, "") or None

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        return self.typed(key, bool, "true or false", default)

    def integer(self, key: str, default: Any, low: int = 0, high: int | None = None) -> int:
        value = self.typed(key, int, "an integer", default)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.error(key, f"must be {bounds}, not {value}")
        return value

    def strings(self, key: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        value = self.raw(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, not {_describe(value)}")
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> Any:
        value = self.string(key, default)
        return self.check_choice(key, value, choices)

    def check_choice(self, key: str, value: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; not {value!r}")
        return value

    def path(self, key: str, default: Any = _REQUIRED) -> Path:
        value = self.string(key, default)
        if not value:
            raise self.error(key, "must be a non-empty path")
        return self.base / Path(value).expanduser()

    def optional_path(self, key: str) -> Path | None:
        value = self.string(key, "")
        return self.base / Path(value).expanduser() if value else None

    def paths(self, key: str) -> tuple[Path, ...]:
        return tuple(self.base / Path(v).expanduser() for v in self.strings(key, []) if v)

    def env_name(self, key: str) -> str | None:
        value = self.optional_string(key)
        if value is not None and not _ENV_NAME.match(value):
            raise self.error(key, f"must be an environment variable name, not {value!r}")
        return value

    def endpoint(self, key: str, role: EndpointRole, default: Any = _REQUIRED) -> str:
        value = self.string(key, default)
        return self.check_endpoint(key, value, role)

    def endpoints(self, key: str, role: EndpointRole, default: Any = _REQUIRED) -> tuple[str, ...]:
        return tuple(self.check_endpoint(key, v, role) for v in self.strings(key, default))

    def check_endpoint(self, key: str, value: str, role: EndpointRole) -> str:
        try:
            return parse_endpoint(value, role, base_dir=self.base).description
        except ConfigError as e:
            raise self.error(key, f"endpoint {value!r}: {e}") from None

    def table(self, key: str, user_keys: bool = False) -> _Table | None:
        self.known.append(key)
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table ([{self.key(key)}]), not {_describe(value)}")
        return _Table(value, self.key(key), self.source, user_keys)

    def mapping(self, key: str) -> dict[str, Any]:
        """A user-keyed table (addresses or domains as keys), keys lower-cased."""
        sub = self.table(key, user_keys=True)
        if sub is None:
            return {}
        out: dict[str, Any] = {}
        for name, value in sub.data.items():
            if not name or name.strip() != name:
                raise sub.error(name, "must be an address or a domain")
            out[name.lower()] = value
        return out

    def finish(self) -> None:
        """Refuse every key that was not read: a typo must not pass silently."""
        for key in self.data:
            if key in self.known:
                continue
            allowed = ", ".join(sorted(self.known)) or "none"
            if not self.name:
                raise self.error(key, f"unknown section; allowed sections: {allowed}")
            raise self.error(key, f"unknown key in [{self.name}]; allowed: {allowed}")


def _describe(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _domain(table: _Table, key: str, value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not value or "@" in value or any(c.isspace() for c in value):
        raise table.error(key, f"{value!r} is not a domain name")
    return value


def _address_or_domain(table: _Table, key: str, value: str) -> str:
    local, at, domain = value.rpartition("@")
    if at and (not local or not domain):
        raise table.error(key, f"{value!r} is neither an address nor a domain")
    return value.lower()


def _policy_map(table: _Table, key: str, choices: tuple[str, ...]) -> Mapping[str, Any]:
    out = {}
    for name, value in table.mapping(key).items():
        sub = f"{key}.{name}"
        if not isinstance(value, str):
            raise table.error(sub, f"must be a string, not {_describe(value)}")
        out[_address_or_domain(table, sub, name)] = table.check_choice(sub, value, choices)
    return MappingProxyType(out)


def _duration(table: _Table, key: str, default: Any) -> int | None:
    """Seconds from an integer or ``"30m"``/``"2h"``/``"1d"``; ``"off"`` or 0 is None."""
    value = table.raw(key, default)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value or None
    if isinstance(value, str):
        if value.strip().lower() in ("off", ""):
            return None
        m = _DURATION.match(value.lower())
        if m:
            return int(m.group(1)) * _DURATION_UNITS[m.group(2)] or None
    raise table.error(
        key, f'must be "off", seconds or a duration like "30m", "2h", "1d"; not {value!r}'
    )


def _tls_pair(table: _Table) -> tuple[Path | None, Path | None]:
    cert, key = table.optional_path("tls_certificate"), table.optional_path("tls_key")
    if (cert is None) != (key is None):
        missing = "tls_key" if key is None else "tls_certificate"
        raise table.error(missing, "tls_certificate and tls_key are set together or not at all")
    return cert, key


# -- the sections ---------------------------------------------------------------------


def _keystore(t: _Table) -> KeystoreConfig:
    url = t.string("url", "sqlite:var/store.db")
    sqlite_path = None
    if url.startswith("sqlite:"):
        rest = url.removeprefix("sqlite:")
        rest = rest[2:] if rest.startswith("///") else rest  # sqlite:///abs -> /abs
        if not rest:
            raise t.error("url", "a sqlite URL needs a file: sqlite:var/store.db")
        sqlite_path = t.base / Path(rest).expanduser()
        url = f"sqlite:{sqlite_path}"
    elif url.startswith(("postgresql://", "postgres://")):
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(url)
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise t.error(
                "url",
                "secrets are never written inline: remove the password from the URL and use "
                "database_password_file (or ~/.pgpass / PGPASSWORD)",
            )
    else:
        raise t.error("url", 'must start with "sqlite:" or "postgresql://"')
    sources = {
        "master_key_file": t.optional_path("master_key_file"),
        "master_key_env": t.env_name("master_key_env"),
        "passphrase_file": t.optional_path("passphrase_file"),
        "passphrase_env": t.env_name("passphrase_env"),
    }
    given = [k for k, v in sources.items() if v is not None]
    if len(given) > 1:
        raise t.error(
            given[1], f"only one master secret source may be set, not {' and '.join(given)}"
        )
    if not given:
        sources["master_key_file"] = t.base / "var" / "master.key"
    module = t.optional_path("pkcs11_module")
    label = t.optional_string("pkcs11_token_label")
    pin = t.optional_path("pkcs11_pin_file")
    if module is None and (label or pin):
        raise t.error("pkcs11_module", "is required when pkcs11_token_label or pin file is set")
    return KeystoreConfig(
        url=url,
        sqlite_path=sqlite_path,
        database_password_file=t.optional_path("database_password_file"),
        pkcs11_module=module,
        pkcs11_token_label=label,
        pkcs11_pin_file=pin,
        **sources,  # type: ignore[arg-type]
    )


def _smime(t: _Table, fallback_authserv_id: str) -> SMIMEConfig:
    return SMIMEConfig(
        authserv_id=t.string("authserv_id", "") or fallback_authserv_id,
        revocation=t.choice("revocation", REVOCATION_POLICIES, "soft-fail"),
        footer=t.boolean("footer", True),
        header_protection=t.boolean("header_protection", False),
        cipher=t.choice("cipher", CIPHERS, "auto"),
        signing_digest=t.choice("signing_digest", SIGNING_DIGESTS, "sha256"),
        trust_anchors=t.paths("trust_anchors"),
        intermediates=t.paths("intermediates"),
        crls=t.paths("crls"),
    )


def _smtp(t: _Table, smime_authserv_id: str) -> SMTPConfig:
    listen = t.endpoints("listen", "server")
    next_hop = t.endpoint("next_hop", "client")
    domains = tuple(_domain(t, "local_domains", d) for d in t.strings("local_domains"))
    if not domains:
        raise t.error("local_domains", "must name at least one domain")
    storage_map: dict[str, Any] = {}
    for name, value in t.mapping("inbound_storage_by_domain").items():
        sub = f"inbound_storage_by_domain.{name}"
        if not isinstance(value, str):
            raise t.error(sub, f"must be a string, not {_describe(value)}")
        storage_map[_domain(t, sub, name)] = t.check_choice(sub, value, INBOUND_STORAGE_MODES)
    cert, key = _tls_pair(t)
    submission = t.endpoints("submission_listen", "server", [])
    auth_dovecot = t.string("auth_dovecot", "")
    if auth_dovecot:
        auth_dovecot = t.check_endpoint("auth_dovecot", auth_dovecot, "client")
    elif submission:
        raise t.error(
            "auth_dovecot",
            "is required when submission_listen is set: Dovecot's auth-client socket, "
            'e.g. "unix:/run/dovecot/auth-client" (the gateway keeps no passwords)',
        )
    plaintext = t.boolean("submission_plaintext", False)
    for endpoint in submission:
        implicit_tls = endpoint.split(":", 1)[0].lower() == "ssl"
        if not (implicit_tls or cert is not None or plaintext):
            raise t.error(
                "submission_listen",
                f"AUTH would never be offered on {endpoint!r}: it is offered over TLS only; "
                "set tls_certificate and tls_key (STARTTLS), use an ssl: endpoint, or "
                "submission_plaintext = true for a trusted loopback listener",
            )
    return SMTPConfig(
        listen=listen,
        next_hop=next_hop,
        local_domains=domains,
        authserv_id=t.string("authserv_id", "") or smime_authserv_id,
        max_message_size=t.integer("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, low=1024),
        max_recipients=t.integer("max_recipients", DEFAULT_MAX_RECIPIENTS, low=1),
        idle_timeout=t.integer("idle_timeout", DEFAULT_SMTP_IDLE_TIMEOUT, low=1),
        next_hop_timeout=t.integer("next_hop_timeout", DEFAULT_NEXT_HOP_TIMEOUT, low=1),
        tls_certificate=cert,
        tls_key=key,
        next_hop_starttls=t.choice("next_hop_starttls", STARTTLS_POLICIES, "opportunistic"),
        next_hop_tls_hostname=t.optional_string("next_hop_tls_hostname"),
        next_hop_ca_file=t.optional_path("next_hop_ca_file"),
        inbound_storage=t.choice("inbound_storage", INBOUND_STORAGE_MODES, "deliver-decrypted"),
        inbound_storage_by_domain=MappingProxyType(storage_map),
        outbound_policy=t.choice("outbound_policy", OUTBOUND_POLICIES, "encrypt-if-possible"),
        internal_policy=t.choice("internal_policy", OUTBOUND_POLICIES, "pass-through"),
        recipient_policy=_policy_map(t, "recipient_policy", OUTBOUND_POLICIES),
        sender_policy=_policy_map(t, "sender_policy", OUTBOUND_POLICIES),
        force_encrypt_keyword=t.optional_string("force_encrypt_keyword"),
        workers=t.integer("workers", 0, low=0, high=MAX_WORKERS),
        submission_listen=submission,
        auth_dovecot=auth_dovecot or None,
        submission_plaintext=plaintext,
    )


def _imap(t: _Table) -> IMAPConfig:
    listen = t.endpoints("listen", "server")
    upstream = t.endpoint("upstream", "client")
    implicit = upstream.split(":", 1)[0].lower() in ("tls", "ssl")
    mode = t.choice("upstream_tls", UPSTREAM_TLS_MODES, "implicit" if implicit else "opportunistic")
    if implicit != (mode == "implicit"):
        raise t.error(
            "upstream_tls",
            "implicit TLS goes with a tls: or ssl: upstream endpoint, "
            f"{mode!r} with a tcp: or unix: one",
        )
    delegation = {}
    for login, value in t.mapping("delegation").items():
        sub = f"delegation.{login}"
        if not isinstance(value, list) or not all(isinstance(v, str) and "@" in v for v in value):
            raise t.error(sub, "must be a list of addresses")
        # the session looks it up by the user's (lower-case) primary address
        delegation[login.strip().lower()] = tuple(v.strip().lower() for v in value)
    cert, key = _tls_pair(t)
    return IMAPConfig(
        listen=listen,
        upstream=upstream,
        plaintext_login=t.boolean("plaintext_login", False),
        tls_certificate=cert,
        tls_key=key,
        upstream_tls=mode,
        upstream_tls_hostname=t.optional_string("upstream_tls_hostname"),
        upstream_ca_file=t.optional_path("upstream_ca_file"),
        sent_folders=t.strings("sent_folders", ["Sent", "Sent Items", "Sent Messages"]),
        encrypt_drafts=t.boolean("encrypt_drafts", False),
        drafts_folders=t.strings("drafts_folders", ["Drafts"]),
        cache_bytes=t.integer("cache_bytes", DEFAULT_IMAP_CACHE_BYTES, low=0),
        idle_timeout=t.integer("idle_timeout", DEFAULT_IMAP_IDLE_TIMEOUT, low=1),
        delegation=MappingProxyType(delegation),
        workers=t.integer("workers", 0, low=0, high=MAX_WORKERS),
    )


def _directory(t: _Table, local_domains: tuple[str, ...]) -> DirectoryConfig:
    dns_listen = t.endpoints("dns_listen", "dns", [])
    domains = tuple(_domain(t, "domains", d) for d in t.strings("domains", list(local_domains)))
    if dns_listen and not domains:
        raise t.error("domains", "the DNS server needs domains (or [smtp] local_domains)")
    usage, selector, matching = DEFAULT_SMIMEA
    push = lookup = None
    if (p := t.table("push")) is not None:
        push = DNSPushConfig(
            server=p.string("server"),
            port=p.integer("port", 53, 1, 65535),
            tsig_key_file=p.path("tsig_key_file"),
            tsig_algorithm=p.choice("tsig_algorithm", TSIG_ALGORITHMS, "hmac-sha256"),
        )
        p.finish()
    if (q := t.table("lookup")) is not None:
        lookup = DNSLookupConfig(
            resolver=q.string("resolver"),
            port=q.integer("port", 53, 1, 65535),
            require_dnssec=q.boolean("require_dnssec", True),
            timeout=q.integer("timeout", 5, 1),
        )
        q.finish()
    return DirectoryConfig(
        dns_listen=dns_listen,
        http_listen=t.endpoints("http_listen", "server", []),
        ldap_listen=t.endpoints("ldap_listen", "server", []),
        domains=domains,
        ttl=t.integer("ttl", 3600, 0, 2**31 - 1),  # RFC 2181 section 8
        # RFC 6698 sections 2.1.1-2.1.3, used unchanged by RFC 8162 section 2
        smimea_usage=t.integer("smimea_usage", usage, 0, 3),
        smimea_selector=t.integer("smimea_selector", selector, 0, 1),
        smimea_matching_type=t.integer("smimea_matching_type", matching, 0, 2),
        push=push,
        lookup=lookup,
    )


def _archive(t: _Table, imap_upstream: str | None) -> ArchiveConfig:
    index_dir = t.path("index_dir")
    raw = t.raw("sources", [])
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise t.error("sources", "must be an array of tables ([[archive.sources]])")
    sources = []
    for i, data in enumerate(raw):
        s = _Table(data, f"archive.sources[{i}]", t.source)
        kind = s.choice("kind", ARCHIVE_SOURCE_KINDS)
        if kind == "imap":
            upstream = s.endpoint("upstream", "client", imap_upstream or _REQUIRED)
            source = ArchiveSource(
                kind, None, None, upstream, s.string("master_user"), s.path("master_password_file")
            )
        else:
            source = ArchiveSource(kind, s.path("path"), s.string("owner"), None, None, None)
        s.finish()
        sources.append(source)
    return ArchiveConfig(
        index_dir=index_dir, sources=tuple(sources), schedule=_duration(t, "schedule", "off")
    )


_SECTIONS = ("keystore", "smime", "smtp", "imap", "directory", "archive", "metrics")


def load_config(
    path: str | os.PathLike[str], *, document: Mapping[str, Any] | None = None
) -> Config:
    """Read, check and resolve the configuration file at ``path``.

    ``document``: the file's TOML as another process parsed it (:attr:`Config.document`),
    used instead of reading the file again; relative paths still resolve against
    ``path``'s directory.

    Raises :class:`ConfigError` (naming the key and the file) for anything wrong: an
    unreadable file, bad TOML (with its line), a missing, unknown, mistyped or
    inline-secret key, a bad enumeration value or endpoint string. Files named by the
    configuration are not opened here.
    """
    source = Path(os.path.abspath(Path(path).expanduser()))
    if document is not None:
        data = dict(document)
    else:
        try:
            with source.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"not valid TOML: {e}", path=str(source)) from None
        except OSError as e:
            raise ConfigError(
                f"cannot read the file: {e.strerror or e}", path=str(source)
            ) from None
    top = _Table(data, "", source)
    sections = {name: top.table(name) for name in _SECTIONS}
    top.finish()

    keystore = _keystore(sections["keystore"] or _Table({}, "keystore", source))
    smtp_t, smime_t = sections["smtp"], sections["smime"] or _Table({}, "smime", source)
    # authserv-id (RFC 7601 section 2.5): [smime] wins, then [smtp], then the first
    # local domain, then this host's name.
    fallback = socket.gethostname()
    if smtp_t is not None:
        smtp_id = smtp_t.data.get("authserv_id")
        domains = smtp_t.data.get("local_domains")
        if isinstance(smtp_id, str) and smtp_id:
            fallback = smtp_id
        elif isinstance(domains, list) and domains and isinstance(domains[0], str):
            fallback = domains[0].strip().lower()
    smime = _smime(smime_t, fallback)
    smtp = _smtp(smtp_t, smime.authserv_id) if smtp_t is not None else None
    imap = _imap(sections["imap"]) if sections["imap"] is not None else None
    directory = archive = metrics = None
    if (t := sections["directory"]) is not None:
        directory = _directory(t, smtp.local_domains if smtp else ())
    if (t := sections["archive"]) is not None:
        archive = _archive(t, imap.upstream if imap else None)
    if (t := sections["metrics"]) is not None:
        metrics = MetricsConfig(listen=t.endpoints("listen", "server"))
    for table in sections.values():
        if table is not None:
            table.finish()
    smime_t.finish()
    return Config(source, keystore, smime, smtp, imap, directory, archive, metrics, data)


_CONTRACT_EXAMPLE = """\
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


def default_config_text(directory: Path) -> str:
    """The file ``smimeproxy init`` writes when the config file is missing.

    It is the contract's example (every face on, loopback only, ``acme.test`` as the
    local domain): a starting point to edit, not a production configuration.
    ``directory`` is where the file will live; relative paths resolve against it.
    """
    header = (
        "# smimeproxy configuration, written by `smimeproxy init`.\n"
        f"# Relative paths are relative to this file's directory ({directory}).\n"
        "# A section that is absent turns that face off; every other key has a default\n"
        "# (see smimeproxy.example.toml). Secrets go in files or environment variables,\n"
        "# never in this file.\n\n"
    )
    return header + _CONTRACT_EXAMPLE
