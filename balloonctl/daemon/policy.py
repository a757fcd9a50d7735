"""The auto-balloon policy: from the host's and the guests' memory to a target per VM, with why.

Pure: no I/O, no clock, no asyncio (docs/contracts.md). The daemon collects a
:class:`HostState` and a :class:`VmState` per VM, calls :func:`decide` once per tick, and acts
on what comes back; it also keeps each VM's :class:`VmMemory` (what the policy remembers
between ticks) and hands it back next tick, across restarts too. The knobs are
:class:`PolicyConfig`, defined here rather than beside the TOML parser
(:mod:`balloonctl.daemon.config` builds it) so that this module imports nothing that does I/O.

What it does, and what it learned from the anchors:

* **Measures what can be had, not what is free.** Host: MemAvailable against MemTotal, plus
  PSI ``some avg10`` when the kernel has it. Guest: its ``available-memory`` (MemAvailable);
  oVirt MoM's MemFree calls a guest full of page cache "used" and never takes from it.
* **Three host modes with a gap between them** (hysteresis). Below ``host_low`` (or PSI at
  ``psi_some_avg10``) the host is under *pressure* and guests give until it is back at the
  midpoint of ``host_low`` and ``host_high``, as ChromeOS concierge moves toward the
  midpoint; below ``host_critical`` they give twice as fast and keep half the headroom. Above
  ``host_high`` the host is *calm* and guests grow back toward their maximum, but only out of
  what lies above ``host_high`` (MoM grows every guest to its maximum whenever it is calm).
  In between nothing moves but guests under their own pressure.
* **A guest keeps its headroom.** It shrinks no further than ``used / (1 - headroom)``, so
  ``guest_headroom`` % of it stays available afterwards (MoM: used + 20 %); a guest without
  deflate-on-OOM, which cannot take memory back when it runs out, keeps more.
* **Guests under their own pressure grow first** (available below ``guest_low`` % of their
  memory), out of what the host has above ``host_low`` and, under pressure, out of what the
  givers release this tick before the host gets any of it.
* **Idle guests give first, in proportion to their shares**: what must be freed is split by
  surplus (memory above the guest's need) divided by shares, so the guest with the most to
  spare and the fewest shares gives most, and nobody gives below its need (Proxmox splits by
  shares only; a busy guest with many shares would still give).
* **Small steps, no jitter.** At most ``max_step`` and ``max_step_percent`` of the VM per tick
  (Proxmox: 100 MiB per 10 s; MoM: 5 %), nothing under the deadband (MoM 0.25 %, Proxmox
  10 MiB, concierge 1 %), targets rounded to MiB. Floors and maxima are never crossed.
* **Unknown means hold.** Missing, stale or impossible statistics hold a VM where it is; so
  does a migration (Proxmox skips those too).
* **A guest that cannot reach its target is backed off**, not pushed every tick: after
  ``settle_ticks`` without getting there (it keeps memory it cannot give up), or as soon as
  it takes memory back through deflate-on-OOM, its target is set to where it is and it is
  not shrunk again for 2, 4, 8 ... ``backoff_max`` ticks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final

from balloonctl.units import format_size

_MIB: Final = 1 << 20

#: Why a VM is held, as a short fixed kind (``Decision.held``, the ``reason`` label of the
#: ``balloonctl_vm_held`` metric): an alert can say "held for stale statistics" without
#: parsing a reason's words. Only the holds that mean "the daemon cannot or will not act on
#: this VM" have one; a VM holding because its host or itself needs nothing has none.
HELD_KINDS: Final = (
    # No reading yet, or stats polling off.
    "no-stats",
    # A reading older than stale_after: a guest whose last-update stopped moving (frozen).
    "stale-stats",
    # A reading no guest can have: negative, not a number, above the VM's RAM or its total,
    # without available-memory, or every value "not reported" (virtio-win's 2**64-1).
    "bad-stats",
    # The VM's size makes no sense (actual outside 1..RAM).
    "bad-size",
    # Migrating: no resize until it is over.
    "migrating",
    # Backing off after a target the guest did not reach or took back.
    "backoff",
    # A target sent and still on its way.
    "pending",
)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """``[policy]``: the auto-balloon policy's knobs (this module's docstring says how each is
    used). Percentages are of the host's MemTotal (``host_*``) or of a guest's memory.

    The defaults follow the anchors: oVirt MoM's 20 % host pressure and 5 % critical
    thresholds and 20 % guest headroom, Proxmox's step cap of about 100 MiB per VM and
    its deadband, ChromeOS concierge's 1 % deadband because every resize costs VM exits.
    """

    #: Host available below this % of MemTotal: the host is under pressure; guests give.
    host_low: float = 20.0
    #: Below this %: critical; guests give twice as fast, down to a smaller headroom.
    host_critical: float = 5.0
    #: Above this %: calm; guests may grow back, but only out of what lies above it.
    host_high: float = 30.0
    #: Host PSI ``some avg10`` (% of time stalled on memory) at which the host is under
    #: pressure whatever MemAvailable says (0 turns PSI off).
    psi_some_avg10: float = 10.0
    #: A guest shrinks no further than used / (1 - headroom): this % of it stays available.
    guest_headroom: float = 20.0
    #: A guest with less than this % of its memory available is under its own pressure.
    guest_low: float = 10.0
    #: Extra headroom (percentage points) for a guest without deflate-on-OOM, which cannot
    #: take memory back from its balloon when it runs out.
    no_deflate_on_oom_headroom: float = 10.0
    #: The most one VM's target moves in one tick (bytes) ...
    max_step: int = 128 << 20
    #: ... and at most this % of the VM's maximum.
    max_step_percent: float = 5.0
    #: Changes smaller than this (bytes) or than ``deadband_percent`` of the VM's memory
    #: are not made.
    deadband: int = 16 << 20
    deadband_percent: float = 1.0
    #: Statistics older than this (seconds) hold a VM where it is.
    stale_after: float = 15.0
    #: Ticks a shrink may take before the guest counts as unable to reach it.
    settle_ticks: int = 3
    #: Longest back-off (ticks) for a guest that could not reach its target; it doubles
    #: from 2 on every failure.
    backoff_max: int = 64


class HostMode(Enum):
    """How the host is doing; see the module docstring."""

    CRITICAL = "critical"
    PRESSURE = "pressure"
    BALANCED = "balanced"
    CALM = "calm"


@dataclass(frozen=True, slots=True)
class HostState:
    """The host's memory (bytes) as /proc/meminfo and /proc/pressure/memory say."""

    total: int
    available: int
    #: ``some avg10`` of /proc/pressure/memory (percent), None when the kernel has no PSI.
    psi_some_avg10: float | None = None


@dataclass(frozen=True, slots=True)
class VmMemory:
    """What the policy remembers about one VM from tick to tick (the daemon persists it)."""

    #: The last target the daemon set, None if none (or it was given up).
    target: int | None = None
    #: The tick it was set at.
    set_tick: int = 0
    #: Whether it was a shrink (a reached shrink ends a run of failures).
    shrink: bool = False
    #: Whether the guest got within the deadband of it.
    reached: bool = False
    #: Consecutive targets the guest could not reach (or took back).
    failures: int = 0
    #: No shrink before this tick (back-off).
    hold_until: int = 0


@dataclass(frozen=True, slots=True)
class VmState:
    """One VM as the daemon found it this tick."""

    name: str
    #: Guest memory now (RAM minus the balloon), bytes.
    actual: int
    #: The VM's RAM: the largest target that means anything.
    maximum: int
    #: Configured floor (bytes).
    floor: int
    shares: int
    #: The guest's statistics (docs/contracts.md names, bytes), None if it never reported.
    stats: Mapping[str, int] | None
    #: Seconds since the guest took that reading.
    stats_age: float
    deflate_on_oom: bool
    memory: VmMemory = VmMemory()
    migrating: bool = False
    #: The guest's stats polling is off (a dry run does not turn it on): say so, rather
    #: than "no statistics yet", which would suggest waiting helps.
    polling_off: bool = False
    #: Why the last reading was refused before it got here (a negative or non-integer
    #: value: the backend's BadStatistics), None if it was not: the VM answers, its report
    #: is unusable, so it is held, not marked down.
    stats_error: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one VM: ``send`` says whether ``target`` is to be set."""

    vm: str
    current: int
    target: int
    send: bool
    reason: str
    #: What to remember for the next tick.
    memory: VmMemory
    #: One of :data:`HELD_KINDS` when the VM is held for a reason an operator may need to
    #: see (unusable statistics, migration, back-off, a move under way), else None.
    held: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """One tick's decisions, in the order the VMs came."""

    mode: HostMode
    host_reason: str
    decisions: tuple[Decision, ...]


# --------------------------------------------------------------------------------------------
# Per VM: what its statistics allow
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Vm:
    """Working state of one VM during :func:`decide`."""

    state: VmState
    floor: int
    cap: int
    deadband: int
    memory: VmMemory
    #: Set when the VM's fate is decided before the host-wide part (hold, back-off, floor).
    early: Decision | None = None
    available: int = 0
    need: int = 0
    pressured: bool = False
    delta: int = 0
    why: str = ""


def _stats_problem(vm: VmState, knobs: PolicyConfig, slack: int) -> tuple[str, str] | None:
    """Why the statistics cannot be used, as (a :data:`HELD_KINDS` kind, words), or None.
    Garbage of every kind holds the VM."""
    stats = vm.stats
    if vm.stats_error is not None:
        return "bad-stats", f"statistics unusable: {vm.stats_error}"
    if stats is None and vm.polling_off:
        return "no-stats", "stats polling is off"
    if stats is None:
        return "no-stats", "no statistics yet"
    if not stats:
        # A guest that reported, with every value "not reported": virtio-win sends 2**64-1
        # for each one, which QEMU cannot tell from a statistic it never got.
        return "bad-stats", "no statistics in the guest's report (each value 'not reported')"
    if not vm.stats_age <= knobs.stale_after:  # also catches NaN
        return (
            "stale-stats",
            f"statistics {vm.stats_age:.0f} s old (stale after {knobs.stale_after:g} s)",
        )
    available = stats.get("available-memory")
    if available is None:
        return "bad-stats", "statistics without available-memory"
    if not 0 <= available <= vm.maximum:
        return "bad-stats", f"statistics say available-memory {available}, outside 0..{vm.maximum}"
    total = stats.get("total-memory")
    if total is not None and not available <= total <= vm.maximum:
        return "bad-stats", f"statistics say total-memory {total} with available-memory {available}"
    if available > vm.actual + slack:
        # A fresh reading cannot have more available than the guest has (ballooned pages
        # are neither free nor cache): this one was taken before the VM shrank, and would
        # make its used memory look like nothing. Not held for long: the next reading
        # follows the resize.
        return (
            "pending",
            f"statistics predate the last resize (available-memory {format_size(available)} "
            f"> size {format_size(vm.actual)})",
        )
    return None


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _prepare(vm: VmState, knobs: PolicyConfig, mode: HostMode, tick: int) -> _Vm:
    """Floor, step cap and deadband; then the early decisions (which need no host view)."""
    maximum = max(vm.maximum, 0)
    floor = min(max(vm.floor, 0), maximum)
    cap = int(min(knobs.max_step, maximum * knobs.max_step_percent / 100.0))
    cap = max(cap, _MIB)
    if mode is HostMode.CRITICAL:
        cap *= 2
    deadband = int(max(knobs.deadband, vm.actual * knobs.deadband_percent / 100.0))
    deadband = min(deadband, cap // 2)
    work = _Vm(vm, floor, cap, deadband, vm.memory)
    work.early = _early(work, knobs, tick)
    return work


def _hold(work: _Vm, reason: str, held: str | None = None) -> Decision:
    vm = work.state
    mem = work.memory
    pending = mem.target if mem.target is not None else vm.actual
    return Decision(vm.name, vm.actual, pending, False, reason, mem, held)


def _early(work: _Vm, knobs: PolicyConfig, tick: int) -> Decision | None:
    """The decisions that need no host view: nonsense, migration, floor, a target in flight,
    back-off, unusable statistics. Updates ``work.memory`` on the way."""
    vm = work.state
    if vm.maximum <= 0 or not 0 < vm.actual <= vm.maximum:
        return _hold(work, f"hold: actual {vm.actual} outside 1..{vm.maximum}", "bad-size")
    if vm.migrating:
        return _hold(work, "hold: migrating", "migrating")
    mem = work.memory
    pending = mem.target
    if pending is not None and pending < work.floor:
        # Set before the floor was raised: forget it, so that no hold or back-off keeps (or
        # sends) a target below the floor; the floor check below decides.
        work.memory = mem = replace(mem, target=None)
        pending = None
    if pending is not None:
        off = vm.actual - pending
        if abs(off) <= work.deadband:
            if not mem.reached:
                # A reached shrink clears the record of failures, but only once the last
                # back-off is backoff_max ticks past: a guest that reaches each shrink and
                # then takes it back (deflate-on-OOM) must still wait 2, 4, 8 ... ticks.
                quiet = mem.shrink and tick - mem.hold_until >= knobs.backoff_max
                work.memory = mem = replace(
                    mem, reached=True, failures=0 if quiet else mem.failures
                )
        elif mem.reached:
            # It got there and moved away since: the guest deflated itself under OOM, or
            # someone else set a target. The first means it needs that memory.
            if off > 0 and vm.deflate_on_oom and mem.shrink:
                return _back_off(work, knobs, tick, "guest took memory back (deflate-on-OOM)")
            work.memory = mem = replace(mem, target=None)
        elif tick - mem.set_tick < knobs.settle_ticks:
            return _hold(work, f"hold: on its way to {format_size(pending)}", "pending")
        elif off > 0:
            return _back_off(
                work,
                knobs,
                tick,
                f"{tick - mem.set_tick} ticks without reaching {format_size(pending)}",
            )
        else:
            work.memory = mem = replace(mem, target=None)  # a growth that did not happen
    if vm.actual < work.floor and not (mem.target == work.floor and mem.reached):
        # (Once raised to within the deadband of its floor, it is not raised every tick.)
        return Decision(
            vm.name,
            vm.actual,
            work.floor,
            True,
            f"raise to its floor {format_size(work.floor)}",
            replace(mem, target=work.floor, set_tick=tick, shrink=False, reached=False),
        )
    problem = _stats_problem(vm, knobs, work.deadband)
    if problem is not None:
        kind, words = problem
        return _hold(work, f"hold: {words}", kind)
    return None


def _back_off(work: _Vm, knobs: PolicyConfig, tick: int, why: str) -> Decision:
    vm = work.state
    failures = work.memory.failures + 1
    wait = min(knobs.backoff_max, 2**failures)
    memory = VmMemory(vm.actual, tick, False, True, failures, tick + wait)
    return Decision(
        vm.name,
        vm.actual,
        vm.actual,
        True,
        f"back off: {why}; stays at {format_size(vm.actual)}, next shrink in {wait} ticks",
        memory,
    )


# --------------------------------------------------------------------------------------------
# Host-wide
# --------------------------------------------------------------------------------------------


def host_mode(host: HostState, knobs: PolicyConfig) -> tuple[HostMode, str]:
    """The host's mode and a few words on why."""
    pct = _pct(host.available, host.total)
    psi = host.psi_some_avg10
    psi_hot = knobs.psi_some_avg10 > 0 and psi is not None and psi >= knobs.psi_some_avg10
    where = f"host available {pct:.1f}%"
    if pct < knobs.host_critical:
        return HostMode.CRITICAL, f"{where} < critical {knobs.host_critical:g}%"
    if pct < knobs.host_low:
        return HostMode.PRESSURE, f"{where} < {knobs.host_low:g}%"
    if psi_hot:
        return HostMode.PRESSURE, f"host PSI some avg10 {psi:.1f}% >= {knobs.psi_some_avg10:g}%"
    if pct > knobs.host_high:
        return HostMode.CALM, f"{where} > {knobs.host_high:g}%"
    return HostMode.BALANCED, f"{where}, between {knobs.host_low:g}% and {knobs.host_high:g}%"


def _assess(work: _Vm, knobs: PolicyConfig, mode: HostMode) -> None:
    """The guest's need (the smallest size that leaves its headroom available)."""
    vm = work.state
    assert vm.stats is not None
    work.available = min(vm.stats["available-memory"], vm.actual)
    used = vm.actual - work.available
    headroom = knobs.guest_headroom
    if not vm.deflate_on_oom:
        headroom += knobs.no_deflate_on_oom_headroom
    if mode is HostMode.CRITICAL:
        # Half the headroom, but never under the guest's own pressure line: a guest shrunk
        # there must not count as under pressure and grow straight back.
        headroom = max(headroom / 2, knobs.guest_low)
    headroom = min(headroom, 90.0)
    # Rounded up: truncated, a guest shrunk to its need keeps a hair less than its headroom,
    # and in critical mode (headroom halved to guest_low by default) that is under its own
    # pressure, so it grows straight back once the host leaves critical.
    need = math.ceil(used / (1.0 - headroom / 100.0))
    work.need = min(max(need, work.floor), vm.maximum)
    work.pressured = work.available < vm.actual * knobs.guest_low / 100.0


def _share_out(amount: int, limits: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Split ``amount`` by ``weights``, nobody above its limit; what a capped one cannot take
    goes to the others (water-filling). The parts sum to min(amount, sum(limits))."""
    parts = [0] * len(limits)
    open_ = [i for i, limit in enumerate(limits) if limit > 0 and weights[i] > 0]
    left = amount
    while left > 0 and open_:
        total = sum(weights[i] for i in open_)
        capped = []
        given = 0
        for i in open_:
            share = int(left * weights[i] / total)
            room = limits[i] - parts[i]
            if share >= room:
                share = room
                capped.append(i)
            parts[i] += share
            given += share
        if not capped:
            # Rounding leaves a few bytes: hand them out one by one.
            rest = left - given
            for i in open_:
                if rest <= 0:
                    break
                extra = min(rest, limits[i] - parts[i])
                parts[i] += extra
                rest -= extra
            break
        left -= given
        open_ = [i for i in open_ if i not in capped]
    return parts


def _fewest(order: list[int], amount: int, min_move: int) -> list[int]:
    """The first VMs of ``order`` that ``amount`` should be split over.

    Split over all of them, each part could fall under the deadband, and then nobody moves
    at all (1000 VMs and 2.5 GiB to free are 2.5 MiB each). Then only the first
    ``amount // min_move`` (at least one) take part: a few VMs move by a step that counts,
    and the next tick's order brings in the others.
    """
    if not order or min_move <= 0 or amount >= min_move * len(order):
        return order
    return order[: max(1, amount // min_move)]


def _givers_share(givers: Sequence[_Vm], release: int, knobs: PolicyConfig) -> list[int]:
    """What each giver gives this tick. Idle guests (at least twice the headroom available)
    cover ``release`` first, split by surplus over shares; the others only give what the idle
    ones' whole surplus cannot cover, so a busy guest is not squeezed while idle ones can pay.
    The split is planned on whole surpluses and then capped per tick, without handing a
    capped guest's part to another: the step caps slow the move, they do not reroute it."""
    idle_line = 2 * knobs.guest_headroom / 100.0
    tiers = (
        [i for i, w in enumerate(givers) if w.available >= idle_line * w.state.actual],
        [i for i, w in enumerate(givers) if w.available < idle_line * w.state.actual],
    )
    takes = [0] * len(givers)
    left = release
    for everyone in tiers:

        def weight(i: int) -> float:
            return (givers[i].state.actual - givers[i].need) / max(givers[i].state.shares, 1)

        order = sorted(everyone, key=weight, reverse=True)
        tier = _fewest(order, left, 2 * max((givers[i].deadband for i in order), default=0))
        surplus = [givers[i].state.actual - givers[i].need for i in tier]
        planned = _share_out(left, surplus, [weight(i) for i in tier])
        left -= sum(planned)
        for i, part in zip(tier, planned, strict=True):
            takes[i] = min(part, givers[i].cap)
    return takes


def decide(host: HostState, vms: Sequence[VmState], knobs: PolicyConfig, tick: int) -> Plan:
    """One tick of the policy: a :class:`Decision` for every VM in ``vms``."""
    mode, host_reason = host_mode(host, knobs)
    works = [_prepare(vm, knobs, mode, tick) for vm in vms]
    live = [w for w in works if w.early is None]
    for work in live:
        _assess(work, knobs, mode)

    # Raises to a floor are decided early, without the host view, and are sent whatever the
    # host has: what they take this tick is not there for anyone else to grow into. (Left
    # out, a guest raised to its floor and its neighbours growing back in the same tick
    # could together push a calm host under host_low, and the neighbours gave it back.)
    raised = sum(
        w.early.target - w.early.current
        for w in works
        if w.early is not None and w.early.send and w.early.target > w.early.current
    )

    low_line = host.total * knobs.host_low / 100.0
    mid_line = host.total * (knobs.host_low + knobs.host_high) / 200.0
    high_line = host.total * knobs.host_high / 100.0

    # 1. Guests under their own pressure: what they want, up to a doubled step.
    hungry = [w for w in live if w.pressured and w.need > w.state.actual]
    wants = [min(w.need - w.state.actual, 2 * w.cap) for w in hungry]
    want_total = sum(wants)

    # 2. What the givers must release.
    pressure = mode in (HostMode.PRESSURE, HostMode.CRITICAL)
    if pressure:
        release = int(max(0.0, mid_line - host.available)) + want_total
    else:
        release = int(max(0.0, want_total - max(0.0, host.available - low_line)))
    givers = [
        w
        for w in live
        if not w.pressured and w.state.actual - w.need > w.deadband and tick >= w.memory.hold_until
    ]
    takes = _givers_share(givers, release, knobs)
    released = 0
    for work, take in zip(givers, takes, strict=True):
        if take > work.deadband:
            work.delta = -take
            released += take
            # Outside pressure, givers give only for the guests under their own pressure.
            why = host_reason if pressure else "for a guest under pressure"
            work.why = (
                f"give: {why}; needs {format_size(work.need)}, "
                f"{_pct(work.available, work.state.actual):.0f}% of it available"
            )

    # 3. Feed the hungry: first from what was released, then from the host above host_low.
    funds = released + int(max(0.0, host.available - low_line - raised))
    if mode is HostMode.CRITICAL:
        critical_line = host.total * knobs.host_critical / 100
        funds = released + int(max(0.0, host.available - critical_line - raised))
    grants = _share_out(min(funds, want_total), wants, [max(w.state.shares, 1) for w in hungry])
    spent = 0
    for work, grant in zip(hungry, grants, strict=True):
        if grant > work.deadband or grant == work.need - work.state.actual > 0:
            work.delta = grant
            spent += grant
            work.why = (
                f"grow: guest under pressure, "
                f"{_pct(work.available, work.state.actual):.1f}% available "
                f"< {knobs.guest_low:g}%"
            )

    # 4. Calm: everyone else may grow back toward its maximum out of what lies above host_high.
    if mode is HostMode.CALM:
        budget = int(max(0.0, host.available - high_line - raised)) - spent
        growers = [
            w for w in live if w.delta == 0 and w.state.actual < w.state.maximum and not w.pressured
        ]
        # The most shrunk grow first when the budget is too small for everyone to move.
        growers.sort(key=lambda w: w.state.actual / w.state.maximum)
        picked = _fewest(
            list(range(len(growers))),
            max(budget, 0),
            2 * max((w.deadband for w in growers), default=0),
        )
        growers = [growers[i] for i in picked]
        room = [min(w.state.maximum - w.state.actual, w.cap) for w in growers]
        gifts = _share_out(max(budget, 0), room, [max(w.state.shares, 1) for w in growers])
        for work, gift in zip(growers, gifts, strict=True):
            if gift > work.deadband or (
                gift > 0 and gift == work.state.maximum - work.state.actual
            ):
                work.delta = gift
                work.why = f"grow back: {host_reason}"

    return Plan(mode, host_reason, tuple(_finish(w, mode, host_reason, tick) for w in works))


def _finish(work: _Vm, mode: HostMode, host_reason: str, tick: int) -> Decision:
    vm = work.state
    if work.early is not None:
        return work.early
    if work.delta == 0:
        if tick < work.memory.hold_until and mode in (HostMode.PRESSURE, HostMode.CRITICAL):
            return _hold(work, f"hold: backing off until tick {work.memory.hold_until}", "backoff")
        if work.pressured:
            return _hold(work, "hold: guest under pressure, nothing to give it")
        return _hold(work, f"hold: {host_reason}")
    if work.delta < 0:
        target = (vm.actual + work.delta + _MIB - 1) // _MIB * _MIB  # round toward actual
    else:
        target = (vm.actual + work.delta) // _MIB * _MIB
        if vm.actual + work.delta >= vm.maximum:
            target = vm.maximum
    target = min(max(target, work.floor), vm.maximum)
    # Rounding to whole MiB from an actual that is not can turn a small move into none or
    # into the other direction (a "grow" that shrinks); in any mode that is a hold.
    if target == vm.actual or (target < vm.actual) != (work.delta < 0):
        return _hold(work, f"hold: {host_reason}")
    return Decision(
        vm.name,
        vm.actual,
        target,
        True,
        work.why,
        VmMemory(
            target, tick, target < vm.actual, False, work.memory.failures, work.memory.hold_until
        ),
    )
