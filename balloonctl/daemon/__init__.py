"""``balloonctl daemon``, the auto-balloon daemon: its configuration, its pure policy, the
per-VM links, the host reader, the tick loop, and what it exports (state, metrics, sd_notify).

``policy`` is pure and ``config`` is the only module that reads the configuration file
(docs/architecture.md).
"""
