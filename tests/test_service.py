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
