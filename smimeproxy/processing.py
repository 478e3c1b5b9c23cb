"""The engine with the key store behind it: what every face calls to open and seal.

The pure engine (:mod:`smimeproxy.smime`) takes keys, certificates and a validator as
arguments; this module fetches them from the key store and the configuration, once,
in one place, so the SMTP gateway, the IMAP proxy, the archive and the command line
behave the same. Everything here is blocking (database reads and CMS work): Twisted
faces call it through a thread pool, never on the reactor.

Several nodes share one store, and a rotation or a new trust anchor made on one node
must be used by the next message on every node. So lookups are kept in memory only
under the store generation (:mod:`smimeproxy.keystore.cache`): each call (or each
:meth:`MessageProcessor.batch`) reads the generation once, and answers from memory
only what was looked up under that same generation; any write on any node moves it.
Kept this way: the path validator over the store's trust (so its per-certificate
caches stay warm), signing identities and decryption keys (unsealed, in memory
only), and the candidates for encryption certificates (chosen and validated at each
use, never kept as a verdict). Certificates from the ``lookup`` (the directory) are
never kept here.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from twisted.logger import Logger

from smimeproxy.config import Config, KeystoreConfig, SMIMEConfig
from smimeproxy.errors import CertificateError, ConfigError, KeyNotFound
from smimeproxy.keystore import MasterSecret, SyncStore, open_store
from smimeproxy.keystore.cache import DEFAULT_SIZE, LookupCache, LookupView
from smimeproxy.keystore.interface import CertificateSource
from smimeproxy.metrics import Registry
from smimeproxy.pki.validation import PathValidator, RevocationPolicy
from smimeproxy.smime.algorithms import DEFAULT_CAPABILITIES
from smimeproxy.smime.keys import KeyPair, load_certificates
from smimeproxy.smime.opener import OpenedMessage, OpenOptions, open_message
from smimeproxy.smime.sealer import EncryptionTarget, SealOptions, seal
from smimeproxy.smime.status import Outcome

#: a certificate source consulted after the store (the directory's SMIMEA lookup)
CertificateLookup = Callable[[str], Sequence[x509.Certificate]]


def master_secret(config: KeystoreConfig, environ: dict[str, str] | None = None) -> MasterSecret:
    """The master secret from wherever the configuration says it is."""
    env = os.environ if environ is None else environ
    if config.master_key_env:
        return MasterSecret.from_env(config.master_key_env, environ=dict(env))
    if config.passphrase_env:
        value = env.get(config.passphrase_env)
        if not value:
            raise ConfigError(
                f"environment variable {config.passphrase_env} is not set",
                key="keystore.passphrase_env",
            )
        return MasterSecret.from_passphrase(value, origin=f"${config.passphrase_env}")
    if config.passphrase_file:
        try:
            text = config.passphrase_file.read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise ConfigError(
                f"cannot read {config.passphrase_file}: {e}", key="keystore.passphrase_file"
            ) from None
        return MasterSecret.from_passphrase(text, origin=str(config.passphrase_file))
    assert config.master_key_file is not None
    return MasterSecret.from_file(config.master_key_file)


def token_resolver(config: KeystoreConfig):  # type: ignore[no-untyped-def]
    """The PKCS#11 token's key resolver when the config names a module, else None."""
    if config.pkcs11_module is None:
        return None
    from smimeproxy.keystore.pkcs11 import PKCS11Token

    if config.pkcs11_pin_file is None or not config.pkcs11_token_label:
        raise ConfigError(
            "a PKCS#11 module needs pkcs11_token_label and pkcs11_pin_file",
            key="keystore.pkcs11_module",
        )
    try:
        pin = config.pkcs11_pin_file.read_text().splitlines()[0]
    except (OSError, IndexError) as e:
        raise ConfigError(
            f"cannot read the PIN file: {e}", key="keystore.pkcs11_pin_file"
        ) from None
    return PKCS11Token(config.pkcs11_module, config.pkcs11_token_label, pin).resolver()


def open_configured_store(config: Config, *, create: bool = False) -> SyncStore:
    """The key store named by ``config`` (blocking), with its PKCS#11 token if any."""
    return open_store(
        config.keystore.url,
        master_secret(config.keystore),
        create=create,
        base=config.path.parent,
        hsm=token_resolver(config.keystore),
    )


def _load_files(paths: Iterable[Path], key: str) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for path in paths:
        try:
            out.extend(load_certificates(path.read_bytes()))
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}", key=key) from None
        except CertificateError as e:
            raise ConfigError(f"{path}: {e}", key=key) from None
    return out


def _load_crls(paths: Iterable[Path]) -> list[x509.CertificateRevocationList]:
    out = []
    for path in paths:
        try:
            data = path.read_bytes()
            out.append(
                x509.load_pem_x509_crl(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_crl(data)
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable CRL: {e}", key="smime.crls") from None
    return out


@dataclass(frozen=True)
class RecipientCertificate:
    """The certificate chosen for a recipient, or why there is none."""

    address: str
    target: EncryptionTarget | None
    reason: str = ""
    source: str = ""


@dataclass(frozen=True)
class SealResult:
    data: bytes
    signed_by: str | None
    encrypted_to: tuple[str, ...]  # addresses whose certificate the copy is encrypted to
    cipher: str | None
    missing: tuple[RecipientCertificate, ...] = field(default=())


class MessageProcessor:
    """Opens and seals messages with keys, certificates and trust from the store."""

    _log = Logger()

    def __init__(
        self,
        store: SyncStore,
        settings: SMIMEConfig,
        *,
        lookup: CertificateLookup | None = None,
        clock: Callable[[], datetime.datetime] | None = None,
        registry: Registry | None = None,
        cache_size: int = DEFAULT_SIZE,
    ):
        self.store = store
        self.lookup = lookup
        self.clock = clock
        #: store lookups kept per store generation (``cache_size=0``: none kept)
        self.cache = LookupCache(store, size=cache_size)
        self._batch = threading.local()
        self.reload(settings)
        registry = registry or Registry()
        self._signatures = registry.counter(
            "smimeproxy_signatures_total",
            "Messages opened, by their RFC 7281 smime= result",
            ("result",),
        )
        self._decryptions = registry.counter(
            "smimeproxy_decryptions_total", "Encrypted messages opened, by outcome", ("outcome",)
        )
        self._lookups = registry.counter(
            "smimeproxy_certificate_lookups_total",
            "Recipient certificate lookups, by source and outcome",
            ("source", "outcome"),
        )
        self._open_seconds = registry.histogram(
            "smimeproxy_open_seconds", "Time to open (decrypt, verify, harvest) one message"
        )
        self._seal_seconds = registry.histogram(
            "smimeproxy_seal_seconds", "Time to seal (sign, encrypt) one message"
        )

    def reload(self, settings: SMIMEConfig) -> None:
        """Take new ``[smime]`` settings and re-read the trust files they name.

        All files are read before anything is swapped, so a bad file raises ConfigError
        and leaves the processor as it was. Not guaranteed: a call running in another
        thread during the swap may see the old settings with the new files.
        """
        anchors = _load_files(settings.trust_anchors, "smime.trust_anchors")
        intermediates = _load_files(settings.intermediates, "smime.intermediates")
        crls = _load_crls(settings.crls)
        # files named in the config are read once: editing them means a reload (SIGHUP)
        self.settings = settings
        self._file_anchors = anchors
        self._file_intermediates = intermediates
        self._file_crls = crls
        self.cache.clear()  # the kept validator was built from the old settings

    # -- the store generation ---------------------------------------------------------------
    def _view(self) -> LookupView:
        """The calling thread's batch view, else a fresh one (one generation read)."""
        view: LookupView | None = getattr(self._batch, "view", None)
        return view if view is not None else self.cache.view()

    @contextmanager
    def batch(self) -> Iterator[LookupView]:
        """Within the block, calls from this thread share one store generation read
        (for callers that open many messages in a row: the IMAP proxy, the archive).
        A change to the store made meanwhile is used from the next batch on. Nested
        blocks share the outer one's view."""
        if getattr(self._batch, "view", None) is not None:
            yield self._batch.view
            return
        self._batch.view = view = self.cache.view()
        try:
            yield view
        finally:
            self._batch.view = None

    # -- trust ---------------------------------------------------------------------------
    def validator(self, view: LookupView | None = None) -> PathValidator:
        """A validator over the store's current trust anchors, intermediates and CRLs
        (and the configured files); the same object while the store generation stays,
        so its per-certificate caches stay warm. It judges time at each validation."""
        view = view or self._view()
        return view.memo("validator", lambda: self._new_validator(view.store))

    def _new_validator(self, store: SyncStore) -> PathValidator:
        kwargs = {"clock": self.clock} if self.clock else {}
        return PathValidator(
            [*self._file_anchors, *store.trust_anchors()],
            [*self._file_intermediates, *store.intermediates()],
            [*self._file_crls, *store.crls()],
            revocation=RevocationPolicy(str(self.settings.revocation)),
            **kwargs,  # type: ignore[arg-type]
        )

    def open_options(self, *, stored: bool = False) -> OpenOptions:
        """Engine options from the config. ``stored``: the message was read from a
        mailbox the gateway delivered into (IMAP proxy, archive), where our own status
        headers are expected and are replaced without a forgery warning."""
        return OpenOptions(
            authserv_id=self.settings.authserv_id,
            footer=self.settings.footer,
            origin="stored" if stored else "transit",
        )

    # -- opening -------------------------------------------------------------------------
    def keys_for(self, owners: Sequence[str], view: LookupView | None = None) -> list[KeyPair]:
        """Every key (all history) of each owner that is a user of the store."""
        view = view or self._view()
        pairs: list[KeyPair] = []
        for owner in owners:
            try:
                pairs.extend(view.decryption_keys(owner))
            except KeyNotFound:
                continue
        return pairs

    def open_for(
        self,
        message: bytes,
        owners: Sequence[str],
        *,
        harvest: bool = True,
        stored: bool = False,
    ) -> OpenedMessage:
        """Open ``message`` with the keys of ``owners`` only (key isolation), verify it,
        and store the certificates of verified signers (never of unverified ones).
        ``stored``: see :meth:`open_options`."""
        started = time.monotonic()
        view = self._view()
        opened = open_message(
            message,
            keys=self.keys_for(owners, view),
            validator=self.validator(view),
            options=self.open_options(stored=stored),
        )
        if harvest:
            self.harvest(opened)
        self._open_seconds.observe(time.monotonic() - started)
        status = opened.status
        if status.signed or status.signers:
            self._signatures.inc(result=str(status.smime_result))
        if status.decryption is not None:
            self._decryptions.inc(outcome="ok" if status.decryption.decrypted else "failed")
        return opened

    def harvest(self, opened: OpenedMessage) -> int:
        """Record each verified signer's certificate and advertised capabilities."""
        count = 0
        for signer in opened.status.signers:
            if not signer.verified or signer.certificate is None:
                continue
            self.store.harvest(signer.certificate, signer.capabilities, verified=True)
            count += 1
        return count

    # -- sealing -------------------------------------------------------------------------
    def certificate_for(self, address: str, view: LookupView | None = None) -> RecipientCertificate:
        """The certificate to encrypt to ``address``: the store first, then the lookup;
        validated for encryption (at this moment) before use."""
        view = view or self._view()
        validator = self.validator(view)
        record = view.encryption_certificate(address)
        candidates: list[tuple[x509.Certificate, tuple[str, ...] | None, str]] = []
        if record is not None:
            caps = record.capabilities or None
            if caps is None and record.source is CertificateSource.LOCAL:
                # one of our users: mail to them is read through this engine (gateway,
                # IMAP proxy, archive), which reads everything it advertises
                caps = DEFAULT_CAPABILITIES
            candidates.append((record.certificate, caps, str(record.source)))
        self._lookups.inc(source="store", outcome="found" if record is not None else "missing")
        if not candidates and self.lookup is not None:
            candidates.extend((cert, None, "lookup") for cert in self.lookup(address))
            self._lookups.inc(source="smimea", outcome="found" if candidates else "missing")
        reasons = []
        for cert, caps, source in candidates:
            status = validator.validate(cert, purpose="encrypt", sender=address)
            failures = [c for c in status.checks if c.outcome is Outcome.FAIL]
            if status.trusted:
                return RecipientCertificate(address, EncryptionTarget(cert, caps), source=source)
            reasons.append("; ".join(f"{c.name}: {c.detail}" for c in failures) or "not trusted")
        reason = " / ".join(reasons) if reasons else "no certificate known"
        return RecipientCertificate(address, None, reason=reason)

    def seal_for(
        self,
        message: bytes,
        sender: str,
        recipients: Sequence[str],
        *,
        sign: bool = True,
        encrypt: bool = True,
        targets: Sequence[RecipientCertificate] | None = None,
    ) -> SealResult:
        """Sign with ``sender``'s current key and, if ``encrypt``, encrypt to every
        recipient *and to the sender* (so the sender's copy stays readable).

        ``targets``: certificates the caller already got from :meth:`certificate_for`
        (validated then), used for the recipients they name instead of looking them up
        and validating again; recipients they do not name are looked up as usual.
        Raises KeyNotFound when a recipient has no usable certificate and ``encrypt`` is
        set: the caller decides (split the copy, refuse, or send signed only).
        """
        started = time.monotonic()
        known = {t.address: t for t in targets or ()}
        view = self._view()
        signer = view.signing_key(sender) if sign else None
        chosen: list[EncryptionTarget] = []
        encrypted_to: list[str] = []
        if encrypt:
            found = [known.get(r) or self.certificate_for(r, view) for r in recipients]
            missing = [f for f in found if f.target is None]
            if missing:
                names = ", ".join(f"{m.address} ({m.reason})" for m in missing)
                raise KeyNotFound(f"no usable certificate for {names}")
            chosen = [f.target for f in found if f.target is not None]
            encrypted_to = [f.address for f in found]
            if sender not in encrypted_to:
                own = known.get(sender) or self.certificate_for(sender, view)
                if own.target is not None:
                    chosen.append(own.target)
                    encrypted_to.append(sender)
        if signer is None and not chosen:
            return SealResult(message, None, (), None)
        cipher = None if str(self.settings.cipher) == "auto" else str(self.settings.cipher)
        options = SealOptions(
            digest=str(self.settings.signing_digest),
            cipher=cipher.replace("-", "_") if cipher else None,
            header_protection=self.settings.header_protection,
        )
        data = seal(
            message,
            signer=signer.pair if signer else None,
            chain=signer.chain if signer else (),
            recipients=chosen,
            options=options,
        )
        self._seal_seconds.observe(time.monotonic() - started)
        return SealResult(
            data,
            sender if signer else None,
            tuple(encrypted_to),
            options.cipher,
        )
