"""Fixtures for the command-line tests: a configured, initialised store per test, and
a helper that runs ``smimeproxy.cli.main`` in-process with captured streams."""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smimeproxy.cli import main
from tests.keystore.conftest import pg_server, pg_url  # noqa: F401 (fixtures)


@dataclass
class Result:
    rc: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.out)


class FakeTTY(io.StringIO):
    """A standard error that claims to be a terminal (so the progress bar draws)."""

    def __init__(self, interrupt_after: int | None = None):
        super().__init__()
        self.writes = 0
        self.interrupt_after = interrupt_after

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.writes += 1
        if self.interrupt_after is not None and self.writes > self.interrupt_after:
            raise KeyboardInterrupt
        return super().write(s)


@dataclass
class CLI:
    config: Path

    def __call__(self, *args: str, stdin: bytes = b"", stderr: io.StringIO | None = None) -> Result:
        out = io.BytesIO()
        err = stderr if stderr is not None else io.StringIO()
        rc = main(
            ["--config", str(self.config), *args], stdin=io.BytesIO(stdin), stdout=out, stderr=err
        )
        return Result(rc, out.getvalue(), err.getvalue())

    def ok(self, *args: str, stdin: bytes = b"") -> Result:
        result = self(*args, stdin=stdin)
        assert result.rc == 0, (args, result.err, result.text[-2000:])
        return result


def write_config(directory: Path, url: str | None = None) -> Path:
    """A minimal config: just the key store (every face off)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "smimeproxy.toml"
    keystore = f'url = "{url}"\n' if url else 'url = "sqlite:var/store.db"\n'
    path.write_text(
        textwrap.dedent(
            """\
            [keystore]
            {keystore}master_key_file = "var/master.key"

            [smime]
            authserv_id = "acme.test"
            """
        ).format(keystore=keystore)
    )
    return path


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    """An initialised SQLite store with an internal root + issuing CA."""
    c = CLI(write_config(tmp_path / "etc"))
    c.ok("init")
    c.ok("ca", "init", "--issuing")
    return c


@pytest.fixture
def make_cli(tmp_path: Path) -> Callable[..., CLI]:
    def make(name: str = "other", url: str | None = None) -> CLI:
        return CLI(write_config(tmp_path / name, url))

    return make


def message(sender: str, to: str, body: str = "hello, world") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: test\r\nMessage-ID: <t@acme.test>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()
