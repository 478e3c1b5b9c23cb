"""Subcommands of the ``smimeproxy`` command, one module per group.

Each module has ``register(subparsers)``, which adds its parser and sets
``func=handler`` with ``handler(args, io) -> int`` (the exit status). The list in
:data:`smimeproxy.cli.COMMANDS` decides the order in ``--help``.
"""
