"""``twistd smimeproxy``: the plugin is found and builds the configured services."""

from __future__ import annotations

import pytest
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
