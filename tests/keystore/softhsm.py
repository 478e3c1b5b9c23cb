"""A throwaway SoftHSM2 token directory for PKCS#11 tests.

SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is first initialised in the
process, and python-pkcs11 keeps the module loaded; so the directory and every token
the tests need are made once per test session, before the module is loaded. Missing
``softhsm2-util``, module or python-pkcs11 skips locally and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require_tool

#: Where Debian's libsofthsm2 puts the module (the first is a symlink to the second).
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

#: Distinctive so a test can search logs and errors for them.
USER_PIN = "pin-7f3a9c21"
SO_PIN = "so-pin-5e8d0b44"
TOKENS = ("smimeproxy-test", "smimeproxy-other")


@dataclass(frozen=True)
class SoftHSM:
    module: str
    conf: Path
    pin: str
    tokens: tuple[str, ...]


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required in CI: .ci/run installs softhsm2 and python-pkcs11)")
    pytest.skip(reason)


def find_module() -> str | None:
    override = os.environ.get("SMIMEPROXY_TEST_PKCS11_MODULE")
    if override:
        return override
    return next((m for m in MODULE_CANDIDATES if Path(m).is_file()), None)


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHSM]:
    """Tokens :data:`TOKENS` (user PIN :data:`USER_PIN`) in a temporary directory."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        _missing("python-pkcs11 is not installed")
    util = require_tool("softhsm2-util")
    module = find_module()
    if module is None:
        _missing("the SoftHSM2 PKCS#11 module (libsofthsm2.so) is not installed")
    assert module is not None
    base = Path(tempfile.mkdtemp(prefix="smimeproxy-softhsm-"))
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        for label in TOKENS:
            subprocess.run(
                [util, "--init-token", "--free", "--label", label, "--pin", USER_PIN,
                 "--so-pin", SO_PIN],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        yield SoftHSM(module, conf, USER_PIN, TOKENS)
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved
        shutil.rmtree(base, ignore_errors=True)
