"""Endpoint strings: Twisted's ``serverFromString``/``clientFromString`` grammar, checked.

Every listener and upstream in the configuration file is an endpoint string such as
``tcp:10025:interface=127.0.0.1``. :func:`parse_endpoint` checks one against Twisted's
grammar and against the parameters its type accepts for a role (a server, a client, or
the DNS listener, which also takes ``udp``), so that a typo stops the start with a
message instead of surfacing when the endpoint is first used, and makes relative file
parameters absolute against the config file's directory.

A module of its own because the grammar and its type tables are one idea, apart from
the TOML schema: :mod:`smimeproxy.config` uses it for every endpoint key and
re-exports :class:`Endpoint` and :func:`parse_endpoint`, and the faces and
``smimeproxy doctor`` call it directly.

Not checked here: that an endpoint can be bound or reached, or that its files exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from smimeproxy.errors import ConfigError

__all__ = ["Endpoint", "EndpointRole", "parse_endpoint"]

EndpointRole = Literal["server", "client", "dns"]
# Per endpoint type: positional parameter names, then every accepted parameter and its
# kind. Mirrors the parsers of twisted.internet.endpoints (serverFromString and
# clientFromString); ``udp`` is ours, for the DNS listener, which Twisted has no string
# form for.
_Spec = tuple[tuple[str, ...], dict[str, str]]
_TCP_SERVER: _Spec = (("port",), {"port": "port0", "interface": "str", "backlog": "int"})
_SSL_SERVER_EXTRA = {"privateKey": "path", "certKey": "path", "sslmethod": "str"}
_SSL_SERVER_EXTRA |= {"extraCertChain": "path", "dhParameters": "path"}
_TCP_CLIENT: _Spec = (
    ("host", "port"),
    {"host": "str", "port": "port", "timeout": "int", "bindAddress": "str"},
)
_ENDPOINT_TYPES: dict[str, dict[str, _Spec]] = {
    "server": {
        "tcp": _TCP_SERVER,
        "tcp6": _TCP_SERVER,
        "ssl": (("port",), _TCP_SERVER[1] | _SSL_SERVER_EXTRA),
        "unix": (
            ("address",),
            {"address": "path", "mode": "octal", "backlog": "int", "lockfile": "flag"},
        ),
    },
    "client": {
        "tcp": _TCP_CLIENT,
        "ssl": (
            ("host", "port"),
            _TCP_CLIENT[1]
            | {"certKey": "path", "privateKey": "path", "caCertsDir": "path", "hostname": "str"},
        ),
        "tls": (
            ("host", "port"),
            _TCP_CLIENT[1] | {"certificate": "path", "privateKey": "path", "trustRoots": "path"},
        ),
        "unix": (("path",), {"path": "path", "timeout": "int", "lockfile": "flag"}),
    },
    "dns": {
        "udp": (("port",), {"port": "port0", "interface": "str"}),
        "tcp": _TCP_SERVER,
        "tcp6": _TCP_SERVER,
    },
}
#: parameters that must be given although Twisted has a default (``server.pem`` in the
#: current directory is never what an operator meant)
_ENDPOINT_REQUIRED = {("server", "ssl"): ("privateKey",)}


@dataclass(frozen=True)
class Endpoint:
    """A checked endpoint string: its type, its parameters, and the string to use.

    ``description`` is the input with relative file parameters (a unix socket, TLS key
    and certificate files) made absolute against the config file's directory; feed it
    to ``serverFromString``/``clientFromString``. Nothing is bound, opened or resolved.
    """

    type: str
    params: Mapping[str, str]
    description: str


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_endpoint(description: str, role: EndpointRole, base_dir: Path | None = None) -> Endpoint:
    """Check an endpoint string against Twisted's grammar and the parameters of its type.

    Raises :class:`ConfigError` (without key or file: the caller adds them) for an
    unknown type, a missing, duplicated or unknown parameter, or a bad number.
    """
    from twisted.internet.endpoints import _parse  # the grammar of serverFromString

    try:
        args, kwargs = _parse(description)  # type: ignore[no-untyped-call]
    except Exception as e:  # the grammar raises plain errors on odd escapes
        raise ConfigError(f"cannot be parsed ({e})") from None
    types = _ENDPOINT_TYPES[role]
    kind = args[0].lower() if args else ""
    if not kind:
        raise ConfigError("is empty; it starts with a type such as tcp:")
    if kind not in types:
        raise ConfigError(f"type {kind!r} is not one of {', '.join(types)} here")
    positional_names, accepted = types[kind]
    values = dict(kwargs)
    positional = args[1:]
    if len(positional) > len(positional_names):
        raise ConfigError(f"too many parameters; {kind} takes {':'.join(positional_names)}")
    for name, value in zip(positional_names, positional, strict=False):
        if name in values:
            raise ConfigError(f"{name} is given twice")
        values[name] = value
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; {kind} accepts {', '.join(accepted)}")
    for name in positional_names + _ENDPOINT_REQUIRED.get((role, kind), ()):
        if not values.get(name):
            raise ConfigError(f"{kind} needs {name}")
    changed = False
    for name, value in values.items():
        check = accepted[name]
        ok = True
        if check in ("port", "port0", "int"):
            ok = value.isascii() and value.isdigit()
            ok = ok and (check == "int" or int(value) <= 65535)
            ok = ok and not (check == "port" and int(value) == 0)
        elif check == "octal":
            ok = bool(re.fullmatch(r"[0-7]{1,4}", value))
        elif check == "flag":
            ok = value in ("0", "1")
        elif check == "path" and base_dir is not None and value:
            resolved = str(base_dir / Path(value).expanduser())
            changed = changed or resolved != value
            values[name] = resolved
        if not ok:
            raise ConfigError(f"{name} must be {_ENDPOINT_CHECKS[check]}, not {value!r}")
    if changed:
        pos = [values[n] for n in positional_names[: len(positional)]]
        rest = [
            f"{k}={_escape(v)}"
            for k, v in values.items()
            if k not in positional_names[: len(positional)]
        ]
        description = ":".join([args[0], *map(_escape, pos), *rest])
    return Endpoint(kind, MappingProxyType(values), description)


_ENDPOINT_CHECKS = {
    "port": "a port number 1-65535",
    "port0": "a port number 0-65535",
    "int": "a number",
    "octal": "an octal mode like 660",
    "flag": "0 or 1",
}
