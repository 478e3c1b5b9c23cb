"""``smimeproxy directory zone DOMAIN``: the SMIMEA records of a domain as zone text."""

from __future__ import annotations

import argparse

from smimeproxy.commands.common import IO
from smimeproxy.commands.store_ops import configured_store
from smimeproxy.directory.publication import Publication
from smimeproxy.directory.zone import zone_file
from smimeproxy.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    directory = sub.add_parser(
        "directory",
        help="certificate publication (DNS SMIMEA)",
        description="Certificate publication: what the directory face serves.",
    )
    dsub = directory.add_subparsers(dest="action", required=True, metavar="zone")
    zone = dsub.add_parser(
        "zone",
        help="print the _smimecert zone of DOMAIN as zone-file text",
        description=(
            "Print the SMIMEA records (RFC 8162) of every local user of DOMAIN with a "
            "current certificate, as a complete zone _smimecert.DOMAIN (SOA, NS, records) "
            "that named-checkzone accepts, or with --records-only just the records."
        ),
    )
    zone.add_argument("domain", metavar="DOMAIN")
    zone.add_argument("--records-only", action="store_true", help="no $ORIGIN, SOA or NS")
    zone.add_argument("--nameserver", metavar="NAME", help="SOA MNAME and NS (default: this host)")
    zone.add_argument("--hostmaster", metavar="NAME", help="SOA RNAME (default hostmaster.DOMAIN)")
    zone.set_defaults(func=zone_command)


def zone_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (config, store):
        settings = config.directory
        domain = args.domain.strip().lower().rstrip(".")
        domains = settings.domains if settings is not None else ()
        if not domains and config.smtp is not None:
            domains = config.smtp.local_domains
        if domain not in domains:
            raise ConfigError(
                f"{domain} is not a published domain ({', '.join(domains) or 'none configured'})",
                key="directory.domains",
                path=str(config.path),
            )
        publication = Publication(store, [domain])
        serial = publication.serial()
        text = zone_file(
            domain,
            publication.everything(domain),
            serial=serial,
            ttl=settings.ttl if settings else 3600,
            parameters=(
                (settings.smimea_usage, settings.smimea_selector, settings.smimea_matching_type)
                if settings
                else (3, 0, 0)
            ),
            nameserver=args.nameserver,
            hostmaster=args.hostmaster,
            records_only=args.records_only,
        )
    io.write(text)
    return 0
