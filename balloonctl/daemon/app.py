"""The composition root of ``balloonctl daemon``: one object graph, built in one place.

As tuned keeps its composition root apart from its controller, this module only puts the
daemon together and runs it: the configuration, the real backends (through
:func:`~balloonctl.daemon.link.backend_for`), the state store, systemd's notify socket and
the metrics endpoint go into one :class:`~balloonctl.daemon.loop.Daemon`, signals are wired,
and the loop ticks. The loop itself knows nothing of how its process was started, so the
bench, the demo and the tests build the same Daemon with fakes instead.
"""

from __future__ import annotations

import contextlib
import resource

from balloonctl.daemon.config import Config
from balloonctl.daemon.link import backend_for
from balloonctl.daemon.loop import Daemon, TickReport
from balloonctl.daemon.sdnotify import Notifier


def build_daemon(config: Config, *, dry_run: bool, state_dir: str | None = None) -> Daemon:
    """The Daemon ``balloonctl daemon`` runs: real backends, the state directory
    (``--state-dir``, else ``[daemon] state_dir``, else systemd's ``$STATE_DIRECTORY``), and
    systemd's notify socket from ``$NOTIFY_SOCKET``. The state store is opened, and the
    metrics endpoint started, when the Daemon is entered (``async with``), so that a
    failure there is reported before the first tick rather than at build time."""
    return Daemon(
        config,
        dry_run=dry_run,
        state_dir=state_dir,
        factory=backend_for,
        notifier=Notifier.from_env(),
    )


async def run_daemon(
    config: Config, *, once: bool, dry_run: bool, state_dir: str | None = None
) -> TickReport | None:
    """The CLI's entry: build the daemon, handle signals, tick."""
    raise_fd_limit()
    async with build_daemon(config, dry_run=dry_run, state_dir=state_dir) as daemon:
        daemon.install_signals()
        return await daemon.run(once=once)


def raise_fd_limit() -> None:
    """One socket per VM: lift the soft RLIMIT_NOFILE to the hard one (systemd's default
    soft limit is 1024, which 1000 VMs would hit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
