"""``twistd smimeproxy``: the plugin is found and builds the configured services."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from smimeproxy.config import load_config
from smimeproxy.service import make_service
from smimeproxy.tap import Options


def test_plugin_is_discoverable():
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "smimeproxy" in makers
    assert makers["smimeproxy"].options is Options


def test_config_is_required():
    with pytest.raises(usage.UsageError):
        Options().parseOptions([])


def test_bad_config_is_a_usage_error_naming_the_file(tmp_path):
    from smimeproxy.tap import makeService

    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nlisten = 5\n")
    options = Options()
    options.parseOptions(["--config", str(bad)])
    with pytest.raises(usage.UsageError, match=r"bad\.toml"):
        makeService(options)


def test_metrics_face_is_built_from_config(tmp_path):
    from smimeproxy.keystore import create_key_file

    create_key_file(tmp_path / "master.key")
    conf = tmp_path / "smimeproxy.toml"
    conf.write_text(
        '[keystore]\nurl = "sqlite:store.db"\nmaster_key_file = "master.key"\n'
        '[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
    )
    from smimeproxy.processing import open_configured_store

    config = load_config(conf)
    open_configured_store(config, create=True).close()
    service = make_service(config)
    names = {s.name for s in service}
    assert "metrics" in names


def _full_config(tmp_path):
    from smimeproxy.keystore import create_key_file

    create_key_file(tmp_path / "master.key")
    conf = tmp_path / "smimeproxy.toml"
    conf.write_text(
        '[keystore]\nurl = "sqlite:store.db"\nmaster_key_file = "master.key"\n'
        "[smtp]\n"
        'listen = ["tcp:0:interface=127.0.0.1"]\n'
        'next_hop = "tcp:127.0.0.1:1"\n'
        'local_domains = ["acme.test"]\n'
        'authserv_id = "acme.test"\n'
        "[imap]\n"
        'listen = ["tcp:0:interface=127.0.0.1"]\n'
        'upstream = "tcp:127.0.0.1:1"\n'
        "plaintext_login = true\n"
        "[directory]\n"
        'dns_listen = ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]\n'
        'http_listen = ["tcp:0:interface=127.0.0.1"]\n'
        "[archive]\n"
        'index_dir = "var/index"\n'
        "[metrics]\n"
        'listen = ["tcp:0:interface=127.0.0.1"]\n'
    )
    from smimeproxy.processing import open_configured_store

    config = load_config(conf)
    open_configured_store(config, create=True).close()
    return config


@pytest_twisted.inlineCallbacks
def test_every_face_is_assembled_and_listens(tmp_path):
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody

    config = _full_config(tmp_path)
    service = make_service(config, reactor=reactor)
    names = {s.name for s in service}
    assert {"smtp", "imap", "directory", "archive", "metrics"} <= names
    service.startService()
    try:
        metrics = service.getServiceNamed("metrics")
        (listener,) = list(metrics)
        port = yield listener._waitingForPort
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        response = yield Agent(reactor).request(b"GET", url)
        yield readBody(response)
        assert response.code == 200
    finally:
        yield service.stopService()


# -- operations: metrics of the message processor, reload, ordered stop ---------------------

PLAIN = (
    b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: figures\r\n"
    b"Content-Type: text/plain\r\n\r\nThe figures.\r\n"
)


@pytest.fixture(scope="module")
def pki():
    from smimeproxy.testing import CertificateFactory

    f = CertificateFactory()
    return {
        "factory": f,
        "alice": f.user("alice@acme.test"),
        "bob": f.user("bob@partner.test"),
        "carol": f.user("carol@partner.test"),
    }


@pytest.fixture
def processor_and_registry(tmp_path, pki):
    import os

    from smimeproxy.config import SMIMEConfig  # noqa: F401  (type of config.smime)
    from smimeproxy.keystore import MasterSecret, open_store
    from smimeproxy.metrics import Registry
    from smimeproxy.processing import MessageProcessor

    config = _full_config(tmp_path)
    store = open_store(
        f"sqlite:{tmp_path / 'p.db'}", MasterSecret(os.urandom(32), "test"), create=True
    )
    store.add_trust(pki["factory"].root.certificate)
    store.import_key(pki["alice"].private_key, pki["alice"].certificate)
    store.import_key(pki["bob"].private_key, pki["bob"].certificate)
    registry = Registry()
    yield MessageProcessor(store, config.smime, registry=registry), registry
    store.close()


def test_processor_counts_signatures_decryptions_lookups_and_latency(processor_and_registry):
    processor, registry = processor_and_registry
    sealed = processor.seal_for(PLAIN, "alice@acme.test", ["bob@partner.test"])
    assert sealed.encrypted_to == ("bob@partner.test", "alice@acme.test")
    opened = processor.open_for(sealed.data, ["bob@partner.test"])
    assert opened.status.decryption.decrypted
    processor.open_for(sealed.data, ["nobody@acme.test"])  # no key of this owner opens it
    assert processor.certificate_for("zed@partner.test").target is None
    text = registry.render().decode()
    assert 'smimeproxy_decryptions_total{outcome="ok"} 1' in text
    assert 'smimeproxy_decryptions_total{outcome="failed"} 1' in text
    assert 'smimeproxy_signatures_total{result="pass"} 1' in text
    assert 'smimeproxy_certificate_lookups_total{source="store",outcome="found"} 2' in text
    assert 'smimeproxy_certificate_lookups_total{source="store",outcome="missing"} 1' in text
    assert "smimeproxy_seal_seconds_count 1" in text
    assert "smimeproxy_open_seconds_count 2" in text


def test_seal_for_uses_targets_already_resolved(processor_and_registry, pki):
    from smimeproxy.errors import KeyNotFound
    from smimeproxy.processing import RecipientCertificate
    from smimeproxy.smime.sealer import EncryptionTarget

    processor, registry = processor_and_registry
    with pytest.raises(KeyNotFound):  # carol's certificate is not in the store
        processor.seal_for(PLAIN, "alice@acme.test", ["carol@partner.test"])
    lookups = registry.counter("smimeproxy_certificate_lookups_total", "", ("source", "outcome"))
    before = lookups.value(source="store", outcome="found")
    carol = RecipientCertificate(
        "carol@partner.test", EncryptionTarget(pki["carol"].certificate, None)
    )
    sealed = processor.seal_for(PLAIN, "alice@acme.test", ["carol@partner.test"], targets=[carol])
    assert sealed.encrypted_to == ("carol@partner.test", "alice@acme.test")
    # only alice's own certificate was looked up: carol's target was taken as given
    assert lookups.value(source="store", outcome="found") == before + 1


def test_reload_swaps_the_smtp_policy_and_refuses_a_bad_config(tmp_path):
    from twisted.internet import reactor

    config = _full_config(tmp_path)
    service = make_service(config, reactor=reactor)
    smtp = service.getServiceNamed("smtp")
    reloader = service.getServiceNamed("reloader")
    assert smtp.factory.settings.config.outbound_policy != "must-encrypt"
    text = config.path.read_text()
    config.path.write_text(
        text.replace(
            'authserv_id = "acme.test"\n',
            'authserv_id = "acme.test"\noutbound_policy = "must-encrypt"\n',
        )
    )
    assert reloader.reload()
    assert smtp.factory.settings.config.outbound_policy == "must-encrypt"
    assert smtp.factory.settings.transform.config.outbound_policy == "must-encrypt"

    config.path.write_text(
        text.replace("[smtp]\n", '[smtp]\ntls_certificate = "nope.pem"\ntls_key = "nope.key"\n')
    )
    assert not reloader.reload()
    assert smtp.factory.settings.config.outbound_policy == "must-encrypt"
    config.path.write_text("not toml [")
    assert not reloader.reload()
    assert reloader.reloads == 1


def test_reload_rereads_trust_anchor_files(tmp_path, processor_and_registry, pki):
    import dataclasses

    from cryptography.hazmat.primitives.serialization import Encoding

    from smimeproxy.errors import ConfigError
    from smimeproxy.testing import CertificateFactory

    processor, _ = processor_and_registry
    other = CertificateFactory()
    anchor = tmp_path / "anchor.pem"
    anchor.write_bytes(other.root.certificate.public_bytes(Encoding.PEM))
    stranger = other.user("dan@partner.test")
    assert not processor.validator().validate(stranger.certificate, purpose="encrypt").trusted
    processor.reload(dataclasses.replace(processor.settings, trust_anchors=(anchor,)))
    assert processor.validator().validate(stranger.certificate, purpose="encrypt").trusted
    with pytest.raises(ConfigError):
        processor.reload(
            dataclasses.replace(processor.settings, trust_anchors=(tmp_path / "gone.pem",))
        )
    assert processor.validator().validate(stranger.certificate, purpose="encrypt").trusted


@pytest_twisted.inlineCallbacks
def test_services_stop_one_after_the_other_newest_first():
    from twisted.application.service import Service
    from twisted.internet import defer

    from smimeproxy.service import OrderedServices

    events = []
    gate = defer.Deferred()

    class Recorder(Service):
        def __init__(self, name, wait=None):
            self.setName(name)
            self.wait = wait

        def stopService(self):
            super().stopService()
            events.append(self.name)
            return self.wait

    root = OrderedServices()
    Recorder("pool").setServiceParent(root)
    Recorder("smtp", gate).setServiceParent(root)
    root.startService()
    stopped = root.stopService()
    assert events == ["smtp"]  # the pool waits for the gateway's drain
    gate.callback(None)
    yield stopped
    assert events == ["smtp", "pool"]
