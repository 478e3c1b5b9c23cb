"""``twistd smimeproxy``: options and makeService, assembly only."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from smimeproxy.config import load_config
from smimeproxy.errors import SMIMEProxyError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Runs every face of smimeproxy that FILE enables: the SMTP gateway ([smtp]), the "
        "IMAP proxy ([imap]), the certificate directory ([directory]), the periodic archive "
        "job ([archive]) and the Prometheus endpoint ([metrics])."
    )
    optParameters = [["config", "c", None, "the smimeproxy TOML configuration file"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def makeService(options: Options) -> IService:
    from smimeproxy.service import make_service

    try:
        config = load_config(options["config"])
        return make_service(config)
    except SMIMEProxyError as e:
        raise usage.UsageError(str(e)) from None
