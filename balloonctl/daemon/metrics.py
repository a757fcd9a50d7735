"""The daemon's Prometheus endpoint (``[daemon] metrics = "127.0.0.1:9712"``; off by default).

prometheus_client is imported only when the endpoint is on. The registry is the daemon's
own (not the library's global one, which would also export this process's GC and platform
collectors under names a dashboard might confuse with the guests'). Series of a VM that is
no longer managed are removed, so a vanished VM does not report its last values forever.

The guest's own reclaim counters (stats tags 10-15, Linux 6.12+ guests on QEMU 9.2+:
:data:`GUEST_COUNTERS`) are exported as Prometheus counters with the values the guest
reports, not counted here: ``rate()`` of them is what the guest did, and a guest reboot is
an ordinary counter reset. A VM whose guest or QEMU does not report one has no series for
it (an absent series, never a 0 that would read as "no reclaim").
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from balloonctl.daemon.policy import Decision, HostState, Plan, VmState
from balloonctl.errors import UsageError
from balloonctl.virtio.spec import STAT_NAMES, StatTag

log = logging.getLogger(__name__)

#: Guest statistics exported as per-VM counters: stat name -> (metric family, help). The
#: exposition adds ``_total`` (prometheus_client's CounterMetricFamily), so byte counters
#: read ``..._bytes_total`` and counts ``..._total``, as Prometheus' naming guide asks.
#: Meanings: virtio.spec.EXTENDED_STAT_TAGS (Linux update_balloon_vm_stats).
GUEST_COUNTERS: Final[Mapping[str, tuple[str, str]]] = {
    STAT_NAMES[StatTag.OOM_KILLS]: (
        "balloonctl_vm_oom_kills",
        "Guest OOM killer kills (Linux vm event oom_kill, stats tag 10)",
    ),
    STAT_NAMES[StatTag.ALLOC_STALLS]: (
        "balloonctl_vm_alloc_stalls",
        "Guest allocations that entered direct reclaim (allocstall, stats tag 11)",
    ),
    STAT_NAMES[StatTag.ASYNC_SCANS]: (
        "balloonctl_vm_async_scanned_bytes",
        "Guest memory scanned by kswapd, background reclaim (pgscan_kswapd, stats tag 12)",
    ),
    STAT_NAMES[StatTag.DIRECT_SCANS]: (
        "balloonctl_vm_direct_scanned_bytes",
        "Guest memory scanned by direct reclaim (pgscan_direct, stats tag 13)",
    ),
    STAT_NAMES[StatTag.ASYNC_RECLAIMS]: (
        "balloonctl_vm_async_reclaimed_bytes",
        "Guest memory reclaimed by kswapd (pgsteal_kswapd, stats tag 14)",
    ),
    STAT_NAMES[StatTag.DIRECT_RECLAIMS]: (
        "balloonctl_vm_direct_reclaimed_bytes",
        "Guest memory reclaimed by direct reclaim (pgsteal_direct, stats tag 15)",
    ),
}


class _GuestCounters:
    """A prometheus_client collector of the guests' counters as last read.

    The daemon's loop replaces :attr:`values` whole each tick and the HTTP thread reads it
    once per scrape: a reference swap, so a scrape sees one tick's values, never half.
    """

    def __init__(self) -> None:
        #: VM name -> {stat name: value}, only the stats its guest reports.
        self.values: dict[str, dict[str, int]] = {}

    def _families(self, values: Mapping[str, Mapping[str, int]]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415

        for stat, (name, doc) in GUEST_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["vm"])
            for vm, stats in values.items():
                if stat in stats:
                    family.add_metric([vm], stats[stat])
            yield family

    def describe(self) -> Iterator[Any]:
        """The families' names, for the registry's duplicate check."""
        return self._families({})

    def collect(self) -> Iterator[Any]:
        """One scrape: every VM's last reading."""
        return self._families(self.values)


class Metrics:
    """Gauges and counters for one daemon, served over HTTP by prometheus_client's thread."""

    def __init__(self, listen: str) -> None:
        from prometheus_client import (  # noqa: PLC0415
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        vm = ["vm"]
        self.actual = Gauge("balloonctl_vm_actual_bytes", "Guest memory now", vm, registry=reg)
        self.target = Gauge("balloonctl_vm_target_bytes", "Last target set", vm, registry=reg)
        self.floor = Gauge("balloonctl_vm_floor_bytes", "Configured floor", vm, registry=reg)
        self.maximum = Gauge("balloonctl_vm_maximum_bytes", "VM RAM", vm, registry=reg)
        self.available = Gauge(
            "balloonctl_vm_available_bytes", "Guest available-memory", vm, registry=reg
        )
        self.host_total = Gauge("balloonctl_host_total_bytes", "Host MemTotal", registry=reg)
        self.host_available = Gauge(
            "balloonctl_host_available_bytes", "Host MemAvailable", registry=reg
        )
        self.host_mode = Gauge(
            "balloonctl_host_mode", "1 for the host's current mode", ["mode"], registry=reg
        )
        self.vms_up = Gauge("balloonctl_vms_up", "VMs answering this tick", registry=reg)
        self.vms_managed = Gauge("balloonctl_vms_managed", "VMs managed", registry=reg)
        self.decisions = Counter(
            "balloonctl_decisions", "Targets set, by action", ["action"], registry=reg
        )
        self.tick = Histogram(
            "balloonctl_tick_seconds",
            "Duration of one collect-decide-act tick",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=reg,
        )
        self.held = Gauge(
            "balloonctl_vm_held",
            "1 while the daemon holds the VM, with why: "
            "no-stats, stale-stats, bad-stats, bad-size, migrating, backoff, pending",
            ["vm", "reason"],
            registry=reg,
        )
        #: VM -> the kind its held series carries now (one series per held VM).
        self._held: dict[str, str] = {}
        self.guest_counters = _GuestCounters()
        reg.register(self.guest_counters)
        self._vms: set[str] = set()
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            self.server, self.thread = start_http_server(int(port), addr=host, registry=reg)
        except OSError as exc:
            raise UsageError(f"metrics endpoint {listen}: {exc.strerror or exc}") from exc
        log.info("metrics on http://%s/metrics", listen)
        bound = str(self.server.server_address[0])
        if not _loopback(bound):
            log.warning(
                "metrics on %s: not a loopback address; the endpoint has no authentication "
                "and no TLS, so anyone who can reach it reads every VM's name and memory "
                "(bind it to 127.0.0.1 or firewall it)",
                listen,
            )

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def observe(
        self, host: HostState | None, plan: Plan | None, vms: Iterable[VmState], managed: int
    ) -> None:
        """One tick's numbers: the VMs as the tick found them, the targets it decided."""
        seen: set[str] = set()
        before = self.guest_counters.values
        counters: dict[str, dict[str, int]] = {}
        for vm in vms:
            seen.add(vm.name)
            self.actual.labels(vm.name).set(vm.actual)
            self.floor.labels(vm.name).set(vm.floor)
            self.maximum.labels(vm.name).set(vm.maximum)
            if vm.stats is not None and "available-memory" in vm.stats:
                self.available.labels(vm.name).set(vm.stats["available-memory"])
            if vm.stats is None:
                # No reading this tick (polling off, none yet): the last one stands, as
                # the available gauge's does.
                kept = before.get(vm.name, {})
            else:
                kept = {name: vm.stats[name] for name in GUEST_COUNTERS if name in vm.stats}
            if kept:
                counters[vm.name] = kept
        self.guest_counters.values = counters  # VMs gone or without them: no series
        for gone in self._vms - seen:
            for gauge in (self.actual, self.floor, self.maximum, self.available, self.target):
                _remove(gauge, gone)
            kind = self._held.pop(gone, None)
            if kind is not None:
                _remove(self.held, gone, kind)
        self._vms = seen
        self.vms_up.set(len(seen))
        self.vms_managed.set(managed)
        if host is not None:
            self.host_total.set(host.total)
            self.host_available.set(host.available)
        if plan is not None:
            for decision in plan.decisions:
                if decision.memory.target is not None:
                    self.target.labels(decision.vm).set(decision.memory.target)
            for mode in ("critical", "pressure", "balanced", "calm"):
                self.host_mode.labels(mode).set(1 if plan.mode.value == mode else 0)
            self._observe_held(plan)

    def _observe_held(self, plan: Plan) -> None:
        """``balloonctl_vm_held{vm,reason} 1`` for each VM the plan holds with a kind; the
        series goes when the VM is no longer held (or is held for another kind), so that
        ``balloonctl_vm_held{reason="stale-stats"} == 1`` is true only while it is."""
        now = {d.vm: d.held for d in plan.decisions if d.held is not None}
        for vm, kind in self._held.items():
            if now.get(vm) != kind:
                _remove(self.held, vm, kind)
        for vm, kind in now.items():
            self.held.labels(vm, kind).set(1)
        self._held = now

    def decided(self, decision: Decision) -> None:
        """Count one sent target."""
        action = decision.reason.split(":", 1)[0]
        self.decisions.labels(action).inc()

    def tick_took(self, seconds: float) -> None:
        """One tick's duration."""
        self.tick.observe(seconds)


def _remove(gauge: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def _loopback(address: str) -> bool:
    """Whether the endpoint's bound address is loopback only (127.0.0.0/8, ::1, or an
    IPv4-mapped loopback); a wildcard (0.0.0.0, ::) or any other address is reachable from
    elsewhere."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
