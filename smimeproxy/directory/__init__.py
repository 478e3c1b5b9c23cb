"""The directory face: every local user's current certificate, published where
partners look, and partners' certificates found the same way.

- :mod:`.publication`: what is published, read live from the key store;
- :mod:`.dns` (+ :mod:`.wire`, :mod:`.records`): the authoritative SMIMEA server;
- :mod:`.push`: RFC 2136 updates into the organisation's own DNS;
- :mod:`.lookup`: outbound SMIMEA lookups (``MessageProcessor(lookup=...)``);
- :mod:`.http`, :mod:`.ldap`: certificate download for mail clients;
- :mod:`.zone`: zone-file text; :mod:`.service`: ``make_service(config, store)``.
"""
