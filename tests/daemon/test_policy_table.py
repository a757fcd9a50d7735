"""Table tests of :func:`balloonctl.daemon.policy.decide`: one scenario per row, numbers checked.

The host has 16 GiB. Unless a row says otherwise a guest has 4 GiB of 8 GiB, 1000 shares,
deflate-on-OOM and fresh statistics; with the default knobs its step cap is 128 MiB
(min(128 MiB, 5 % of 8 GiB)) and its deadband 40.96 MiB (1 % of 4 GiB). An *idle* guest has
60 % available: used 1.6 GiB, so it needs 2 GiB (used / 0.8) and has 2 GiB to spare. A
*busy* guest has 25 % available (below the 40 % idle line): it needs 3.75 GiB. A *hungry*
guest has 5 % available (below guest_low): it needs 4.75 GiB, 768 MiB more than it has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest

from balloonctl.daemon.policy import (
    Decision,
    HostMode,
    HostState,
    Plan,
    PolicyConfig,
    VmMemory,
    VmState,
    decide,
    host_mode,
)

MiB = 1 << 20
GiB = 1 << 30
HOST_TOTAL = 16 * GiB
TICK = 100

KNOBS = PolicyConfig()
#: Steps as large as the guests, to see where a move ends rather than how fast it goes.
BIG = PolicyConfig(max_step=64 * GiB, max_step_percent=100.0)
#: No deadband at all.
NO_DEADBAND = PolicyConfig(deadband=0, deadband_percent=0.0)

_AUTO: Mapping[str, int] = {"auto": 1}


def host(pct: float, psi: float | None = None) -> HostState:
    return HostState(HOST_TOTAL, round(HOST_TOTAL * pct / 100), psi)


def guest(
    name: str,
    avail_pct: float = 60.0,
    *,
    actual: int = 4 * GiB,
    maximum: int = 8 * GiB,
    floor: int = 0,
    shares: int = 1000,
    stats: Mapping[str, int] | None = _AUTO,
    age: float = 1.0,
    doom: bool = True,
    memory: VmMemory | None = None,
    migrating: bool = False,
) -> VmState:
    if stats is _AUTO:
        stats = {"available-memory": int(actual * avail_pct / 100), "total-memory": actual}
    return VmState(
        name,
        actual,
        maximum,
        floor,
        shares,
        stats,
        age,
        doom,
        VmMemory() if memory is None else memory,
        migrating,
    )


def idle(name: str = "idle", **kw: object) -> VmState:
    return guest(name, 60.0, **kw)  # type: ignore[arg-type]


def busy(name: str = "busy", **kw: object) -> VmState:
    return guest(name, 25.0, **kw)  # type: ignore[arg-type]


def hungry(name: str = "hungry", **kw: object) -> VmState:
    return guest(name, 5.0, **kw)  # type: ignore[arg-type]


def by_name(plan: Plan) -> dict[str, Decision]:
    return {d.vm: d for d in plan.decisions}


@dataclass(frozen=True)
class Want:
    """What a row expects of one VM: the target (None: where it is), send, reason prefix."""

    target: int | None
    send: bool
    prefix: str
    contains: tuple[str, ...] = field(default=())


def hold(*contains: str) -> Want:
    return Want(None, False, "hold:", contains)


def mib(n: float) -> int:
    return int(n * MiB)


# --------------------------------------------------------------------------------------------
# The scenario table
# --------------------------------------------------------------------------------------------

SCENARIOS = [
    # --- pressure: idle guests first, by shares, never below need or floor -----------------
    pytest.param(
        host(19),
        [idle(), busy()],
        KNOBS,
        HostMode.PRESSURE,
        {"idle": Want(mib(4096 - 128), True, "give:"), "busy": hold()},
        id="pressure-idle-gives-busy-holds",
    ),
    pytest.param(
        host(5.5),  # 3.12 GiB to free: more than the idle guest's 2 GiB surplus
        [idle(), busy()],
        KNOBS,
        HostMode.PRESSURE,
        {
            "idle": Want(mib(4096 - 128), True, "give:"),
            "busy": Want(mib(4096 - 128), True, "give:"),
        },
        id="pressure-busy-gives-when-idle-cannot-cover",
    ),
    pytest.param(
        host(19.5),  # 901.12 MiB to free, split 3:1 against the shares
        [idle("few", shares=1000), idle("many", shares=3000)],
        BIG,
        HostMode.PRESSURE,
        {"few": Want(mib(3421), True, "give:"), "many": Want(mib(3871), True, "give:")},
        id="pressure-more-shares-give-less",
    ),
    pytest.param(
        host(10),  # 2.4 GiB to free, more than the 2 GiB the guest has to spare
        [idle()],
        BIG,
        HostMode.PRESSURE,
        # used / 0.8 = 2 GiB + 0.75 B, rounded up to whole MiB.
        {"idle": Want(mib(2049), True, "give:", ("needs 2 GiB",))},
        id="pressure-never-below-need",
    ),
    pytest.param(
        host(10),
        [idle(floor=3 * GiB)],
        BIG,
        HostMode.PRESSURE,
        {"idle": Want(3 * GiB, True, "give:")},
        id="pressure-never-below-floor",
    ),
    pytest.param(
        host(10),
        [idle(doom=False)],
        BIG,
        HostMode.PRESSURE,
        # Same guest as pressure-never-below-need, without deflate-on-OOM: used / 0.7.
        {"idle": Want(mib(2341), True, "give:")},
        id="no-deflate-on-oom-keeps-more-headroom",
    ),
    pytest.param(
        host(19),
        [guest("tight", 21.0)],  # needs 4 GiB * 0.79 / 0.8 = actual - 51 MiB > deadband
        KNOBS,
        HostMode.PRESSURE,
        {"tight": Want(mib(4096 - 51), True, "give:")},
        id="pressure-small-surplus-given-whole",
    ),
    pytest.param(
        host(19),
        [guest("snug", 20.7)],  # surplus 4 GiB * 0.007 / 0.8 = 35.84 MiB: under the deadband
        KNOBS,
        HostMode.PRESSURE,
        {"snug": hold()},
        id="pressure-surplus-within-deadband-holds",
    ),
    # --- critical: doubled step, half the headroom -------------------------------------------
    pytest.param(
        host(4),
        [idle()],
        KNOBS,
        HostMode.CRITICAL,
        {"idle": Want(mib(4096 - 256), True, "give:", ("critical",))},
        id="critical-doubled-step",
    ),
    pytest.param(
        host(1),
        [idle()],
        BIG,
        HostMode.CRITICAL,
        # Headroom 10 %: used / 0.9 (pressure-never-below-need: 2049 MiB).
        {"idle": Want(mib(1821), True, "give:")},
        id="critical-half-headroom",
    ),
    pytest.param(
        host(1),
        [idle(doom=False)],
        BIG,
        HostMode.CRITICAL,
        # Without deflate-on-OOM, (20 + 10) / 2 = 15 %: used / 0.85.
        {"idle": Want(mib(1928), True, "give:")},
        id="critical-half-headroom-without-deflate-on-oom",
    ),
    # --- calm: grow back out of what lies above host_high, by shares -------------------------
    pytest.param(
        host(40),
        [idle()],
        KNOBS,
        HostMode.CALM,
        {"idle": Want(mib(4096 + 128), True, "grow back:")},
        id="calm-grows-back-one-step",
    ),
    pytest.param(
        host(31),  # 163.84 MiB above host_high
        [idle()],
        BIG,
        HostMode.CALM,
        {"idle": Want(mib(4096 + 163), True, "grow back:")},
        id="calm-grows-only-out-of-what-lies-above-high",
    ),
    pytest.param(
        host(32),  # 327.68 MiB above host_high, split 1:3 by shares
        [idle("few", shares=1000), idle("many", shares=3000)],
        BIG,
        HostMode.CALM,
        {
            "few": Want(mib(4096 + 81), True, "grow back:"),
            "many": Want(mib(4096 + 245), True, "grow back:"),
        },
        id="calm-split-by-shares",
    ),
    pytest.param(
        host(40),
        [idle(actual=8 * GiB - 5 * MiB)],  # 5 MiB short: less than the deadband, still sent
        KNOBS,
        HostMode.CALM,
        {"idle": Want(8 * GiB, True, "grow back:")},
        id="calm-last-bit-to-maximum",
    ),
    pytest.param(
        host(40),
        [idle(actual=8 * GiB - 5 * MiB, maximum=8 * GiB - 12345)],
        KNOBS,
        HostMode.CALM,
        {"idle": Want(8 * GiB - 12345, True, "grow back:")},
        id="calm-grows-to-an-unaligned-maximum",
    ),
    pytest.param(
        host(40),
        [idle(actual=8 * GiB)],
        KNOBS,
        HostMode.CALM,
        {"idle": hold("> 30%")},
        id="calm-at-maximum-holds",
    ),
    pytest.param(
        host(30.1),  # 16.4 MiB above host_high: under the deadband
        [idle()],
        KNOBS,
        HostMode.CALM,
        {"idle": hold()},
        id="calm-growth-within-deadband-not-sent",
    ),
    pytest.param(
        host(30.1),
        [idle()],
        NO_DEADBAND,
        HostMode.CALM,
        {"idle": Want(mib(4096 + 16), True, "grow back:")},
        id="calm-growth-without-deadband-sent",
    ),
    # --- balanced: only guests under their own pressure move ---------------------------------
    pytest.param(
        host(25),
        [idle(), busy()],
        KNOBS,
        HostMode.BALANCED,
        {"idle": hold("between 20% and 30%"), "busy": hold("between")},
        id="balanced-holds",
    ),
    pytest.param(
        host(25),  # 819 MiB above host_low pays for it
        [hungry(), idle()],
        KNOBS,
        HostMode.BALANCED,
        # Wants 768 MiB, at most twice its 128 MiB step.
        {"hungry": Want(mib(4096 + 256), True, "grow:"), "idle": hold()},
        id="balanced-hungry-grows-doubled-step",
    ),
    pytest.param(
        host(20.5),  # 81.92 MiB above host_low; the idle guest gives the rest
        [hungry(), idle()],
        KNOBS,
        HostMode.BALANCED,
        {
            "hungry": Want(mib(4096 + 209), True, "grow:"),
            "idle": Want(mib(4096 - 128), True, "give:"),
        },
        id="balanced-hungry-beyond-host-funds-takes-from-idle",
    ),
    # --- guests under their own pressure grow first, funded by the givers ---------------------
    pytest.param(
        host(15),
        [hungry(), idle()],
        KNOBS,
        HostMode.PRESSURE,
        {
            "hungry": Want(mib(4096 + 128), True, "grow:"),
            "idle": Want(mib(4096 - 128), True, "give:"),
        },
        id="pressure-hungry-grows-out-of-what-givers-release",
    ),
    pytest.param(
        host(15),
        [hungry(), busy()],  # no idle guest: the busy one pays
        KNOBS,
        HostMode.PRESSURE,
        {
            "hungry": Want(mib(4096 + 128), True, "grow:"),
            "busy": Want(mib(4096 - 128), True, "give:"),
        },
        id="pressure-hungry-funded-by-busy-giver",
    ),
    pytest.param(
        host(15),
        [hungry()],
        KNOBS,
        HostMode.PRESSURE,
        {"hungry": hold("under pressure", "nothing to give")},
        id="pressure-hungry-without-givers-holds",
    ),
    pytest.param(
        host(4),
        [guest("hungry", 1.0, actual=8 * GiB, maximum=16 * GiB), idle("a"), idle("b")],
        KNOBS,
        HostMode.CRITICAL,
        # Critical doubles the step (2 * 128 MiB) and a guest under its own pressure may take
        # twice that; it needs 8 GiB * 0.99 / 0.9 (819 MiB more), a and b release 512 MiB.
        {
            "hungry": Want(mib(8192 + 512), True, "grow:"),
            "a": Want(mib(4096 - 256), True, "give:"),
            "b": Want(mib(4096 - 256), True, "give:"),
        },
        id="critical-hungry-grows-four-base-steps",
    ),
    pytest.param(
        host(40),
        [hungry(), idle()],
        KNOBS,
        HostMode.CALM,
        {
            "hungry": Want(mib(4096 + 256), True, "grow:"),
            "idle": Want(mib(4096 + 128), True, "grow back:"),
        },
        id="calm-hungry-grows-before-the-rest",
    ),
    # --- PSI ----------------------------------------------------------------------------------
    pytest.param(
        host(22, psi=15.0),
        [idle()],
        KNOBS,
        HostMode.PRESSURE,
        {"idle": Want(mib(4096 - 128), True, "give:", ("PSI",))},
        id="psi-over-threshold-is-pressure",
    ),
    pytest.param(
        host(22, psi=5.0),
        [idle()],
        KNOBS,
        HostMode.BALANCED,
        {"idle": hold()},
        id="psi-under-threshold-balanced",
    ),
    pytest.param(
        host(22),
        [idle()],
        KNOBS,
        HostMode.BALANCED,
        {"idle": hold()},
        id="no-psi-balanced",
    ),
    pytest.param(
        host(22, psi=99.0),
        [idle()],
        PolicyConfig(psi_some_avg10=0),
        HostMode.BALANCED,
        {"idle": hold()},
        id="psi-turned-off",
    ),
    pytest.param(
        host(60, psi=50.0),
        [idle(), hungry()],
        KNOBS,
        HostMode.PRESSURE,
        # Plenty MemAvailable, but stalled: no growing back, and the idle guest pays for
        # the hungry one.
        {
            "idle": Want(mib(4096 - 128), True, "give:"),
            "hungry": Want(mib(4096 + 256), True, "grow:"),
        },
        id="psi-pressure-despite-plenty-available",
    ),
    # --- step caps and rounding ---------------------------------------------------------------
    pytest.param(
        host(10),
        [idle(maximum=16 * GiB)],
        PolicyConfig(max_step=32 * MiB),
        HostMode.PRESSURE,
        {"idle": Want(mib(4096 - 32), True, "give:")},
        id="step-capped-by-max-step",
    ),
    pytest.param(
        host(10),
        [idle(actual=GiB, maximum=GiB)],
        KNOBS,
        HostMode.PRESSURE,
        # 5 % of 1 GiB = 51.2 MiB; the target rounds toward where the guest is.
        {"idle": Want(mib(1024 - 51), True, "give:")},
        id="step-capped-by-max-step-percent",
    ),
    pytest.param(
        host(10),
        [idle(actual=16 * MiB, maximum=16 * MiB)],
        KNOBS,
        HostMode.PRESSURE,
        {"idle": Want(mib(15), True, "give:")},
        id="step-at-least-one-mib",
    ),
    pytest.param(
        host(10),
        [idle(actual=4 * GiB + 123457)],
        KNOBS,
        HostMode.PRESSURE,
        {"idle": Want(mib(4096 - 127), True, "give:")},
        id="unaligned-actual-rounds-to-mib-toward-actual",
    ),
]


@pytest.mark.parametrize(("host_state", "vms", "knobs", "mode", "want"), SCENARIOS)
def test_scenario(
    host_state: HostState,
    vms: list[VmState],
    knobs: PolicyConfig,
    mode: HostMode,
    want: dict[str, Want],
) -> None:
    plan = decide(host_state, vms, knobs, TICK)
    assert plan.mode is mode
    assert [d.vm for d in plan.decisions] == [vm.name for vm in vms]
    got = by_name(plan)
    for vm in vms:
        d, w = got[vm.name], want[vm.name]
        assert d.current == vm.actual
        assert d.reason.startswith(w.prefix), d.reason
        for text in w.contains:
            assert text in d.reason, d.reason
        assert d.send is w.send, d
        assert d.target == (vm.actual if w.target is None else w.target), (
            (d.target - vm.actual) / MiB,
            d.reason,
        )
        if d.send:
            assert d.memory.target == d.target
            assert d.memory.set_tick == TICK
            assert d.memory.shrink is (d.target < vm.actual)
            assert not d.memory.reached
            assert min(vm.floor, vm.maximum) <= d.target <= vm.maximum
            assert d.target % MiB == 0 or d.target in (vm.floor, vm.maximum)
        else:
            assert d.memory == vm.memory


def test_busy_guest_holds_while_idle_ones_cover_it_all() -> None:
    """The split is planned on whole surpluses, so a busy guest with the most shares-weighted
    surplus still gives nothing while the idle ones can pay, even if they are step-capped."""
    plan = decide(host(19), [busy("busy", shares=1), idle("a"), idle("b")], KNOBS, TICK)
    got = by_name(plan)
    assert not got["busy"].send
    assert got["a"].target == got["b"].target == mib(4096 - 128)


# --------------------------------------------------------------------------------------------
# Unknown means hold
# --------------------------------------------------------------------------------------------

HOLDS = [
    pytest.param({"stats": None}, "no statistics", id="no-stats"),
    pytest.param({"stats": {}}, "no statistics", id="empty-stats"),
    pytest.param({"age": 16.0}, "old", id="stale"),
    pytest.param({"age": math.nan}, "old", id="nan-age"),
    pytest.param({"age": math.inf}, "old", id="inf-age"),
    pytest.param({"stats": {"available-memory": -1}}, "outside", id="negative-available"),
    pytest.param(
        {"stats": {"available-memory": 8 * GiB + 1}}, "outside", id="available-above-maximum"
    ),
    pytest.param(
        {"stats": {"available-memory": 2 * GiB, "total-memory": GiB}},
        "total-memory",
        id="available-above-total",
    ),
    pytest.param(
        {"stats": {"available-memory": GiB, "total-memory": 9 * GiB}},
        "total-memory",
        id="total-above-maximum",
    ),
    pytest.param(
        {"stats": {"free-memory": 2 * GiB, "total-memory": 4 * GiB}},
        "without available-memory",
        id="missing-available-memory",
    ),
    pytest.param(
        {"stats": {"available-memory": 5 * GiB}},
        "statistics",
        id="available-above-actual-reading-from-before-a-resize",
    ),
    pytest.param({"migrating": True}, "migrating", id="migrating"),
    pytest.param({"actual": 0}, "outside", id="actual-zero"),
    pytest.param({"actual": 9 * GiB}, "outside", id="actual-above-maximum"),
    pytest.param({"maximum": 0, "actual": 1}, "outside", id="maximum-zero"),
]


@pytest.mark.parametrize("pct", [4, 15, 40], ids=["critical", "pressure", "calm"])
@pytest.mark.parametrize(("kw", "words"), HOLDS)
def test_unknown_holds(kw: dict[str, object], words: str, pct: float) -> None:
    vm = idle("vm", **kw)
    d = decide(host(pct), [vm, hungry()], KNOBS, TICK).decisions[0]
    assert d.reason.startswith("hold:"), d.reason
    assert words in d.reason, d.reason
    assert not d.send
    assert d.target == vm.actual
    assert d.memory == VmMemory()


def test_held_vm_keeps_its_pending_target() -> None:
    mem = VmMemory(target=mib(3968), set_tick=TICK - 1, shrink=True)
    d = decide(host(15), [idle(memory=mem, migrating=True)], KNOBS, TICK).decisions[0]
    assert (d.send, d.target, d.memory) == (False, mib(3968), mem)
    assert d.reason == "hold: migrating"


# --------------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------------

FLOORS = [
    pytest.param({}, 5 * GiB, id="fresh-stats"),
    pytest.param({"stats": None}, 5 * GiB, id="without-stats"),
    pytest.param({"age": math.nan}, 5 * GiB, id="garbage-stats"),
    pytest.param({"floor": 10 * GiB}, 8 * GiB, id="floor-above-maximum-means-maximum"),
    pytest.param({"actual": 4 * GiB + 1}, 5 * GiB, id="unaligned-actual"),
]


@pytest.mark.parametrize("pct", [4, 25, 40], ids=["critical", "balanced", "calm"])
@pytest.mark.parametrize(("kw", "target"), FLOORS)
def test_actual_below_floor_raises_to_floor(kw: dict[str, object], target: int, pct: float) -> None:
    args: dict[str, object] = {"floor": 5 * GiB, **kw}
    vm = idle("vm", **args)
    d = decide(host(pct), [vm], KNOBS, TICK).decisions[0]
    assert d.reason.startswith("raise to its floor"), d.reason
    assert (d.send, d.target) == (True, target)
    assert d.memory == VmMemory(target, TICK, False, False, 0, 0)


def test_floor_raise_in_flight_holds_then_is_sent_again() -> None:
    mem = VmMemory(target=5 * GiB, set_tick=TICK - 1)
    on_way = decide(host(15), [idle(floor=5 * GiB, memory=mem)], KNOBS, TICK).decisions[0]
    assert on_way.reason.startswith("hold: on its way"), on_way.reason
    assert (on_way.send, on_way.target) == (False, 5 * GiB)
    late = decide(host(15), [idle(floor=5 * GiB, memory=mem)], KNOBS, TICK + 5).decisions[0]
    assert late.reason.startswith("raise to its floor"), late.reason
    assert (late.send, late.target) == (True, 5 * GiB)


def test_pending_shrink_below_a_raised_floor_is_not_backed_off_to() -> None:
    """Regression: the floor was raised above a VM that had not reached its shrink target;
    the back-off sent a target of where the VM was, below the (new) floor."""
    mem = VmMemory(target=3 * GiB, set_tick=0, shrink=True)
    vm = idle(floor=5 * GiB, memory=mem)
    d = decide(host(40), [vm], KNOBS, 10).decisions[0]
    assert d.reason.startswith("raise to its floor"), d.reason
    assert (d.send, d.target) == (True, 5 * GiB)


# --------------------------------------------------------------------------------------------
# A target in flight, back-off, deflate-on-OOM
# --------------------------------------------------------------------------------------------


def test_shrink_in_flight_holds_then_backs_off() -> None:
    first = decide(host(19), [idle()], KNOBS, 10).decisions[0]
    assert (first.send, first.target) == (True, mib(4096 - 128))
    mem = first.memory
    assert mem == VmMemory(mib(3968), 10, True, False, 0, 0)
    for tick in (11, 12):  # settle_ticks = 3
        d = decide(host(19), [idle(memory=mem)], KNOBS, tick).decisions[0]
        assert d.reason.startswith("hold: on its way"), d.reason
        assert (d.send, d.target, d.memory) == (False, mib(3968), mem)
    d = decide(host(19), [idle(memory=mem)], KNOBS, 13).decisions[0]
    assert d.reason.startswith("back off:"), d.reason
    assert "3 ticks without reaching" in d.reason
    assert (d.send, d.target) == (True, 4 * GiB)
    assert d.memory == VmMemory(4 * GiB, 13, False, True, 1, 15)
    # No shrink during the back-off, even under pressure ...
    mem = d.memory
    d = decide(host(19), [idle(memory=mem)], KNOBS, 14).decisions[0]
    assert d.reason.startswith("hold: backing off until tick 15"), d.reason
    assert not d.send
    # ... and it gives again once it is over.
    d = decide(host(19), [idle(memory=mem)], KNOBS, 15).decisions[0]
    assert d.reason.startswith("give:"), d.reason
    assert (d.send, d.target) == (True, mib(3968))
    assert (d.memory.failures, d.memory.hold_until) == (1, 15)


@pytest.mark.parametrize(
    ("failures", "backoff_max", "wait"),
    [
        (0, 64, 2),
        (1, 64, 4),
        (2, 64, 8),
        (3, 64, 16),
        (4, 64, 32),
        (5, 64, 64),
        (6, 64, 64),
        (20, 64, 64),
        (2, 5, 5),
    ],
    ids=str,
)
def test_back_off_doubles_up_to_backoff_max(failures: int, backoff_max: int, wait: int) -> None:
    knobs = PolicyConfig(backoff_max=backoff_max)
    mem = VmMemory(mib(3968), TICK - 3, True, False, failures, 0)
    d = decide(host(19), [idle(memory=mem)], knobs, TICK).decisions[0]
    assert d.reason.startswith("back off:"), d.reason
    assert f"next shrink in {wait} ticks" in d.reason
    assert d.memory.failures == failures + 1
    assert d.memory.hold_until == TICK + wait


@pytest.mark.parametrize(
    ("shrink", "hold_until", "failures_after"),
    [
        (True, TICK - KNOBS.backoff_max, 0),
        (True, TICK - 5, 3),
        (False, TICK - KNOBS.backoff_max, 3),
    ],
    ids=["shrink-long-after-the-back-off", "shrink-soon-after-the-back-off", "grow"],
)
def test_reached_shrink_resets_failures(shrink: bool, hold_until: int, failures_after: int) -> None:
    """A reached shrink clears the failures once the last back-off is backoff_max ticks past;
    sooner, a guest that reaches each shrink and takes it back must keep escalating."""
    mem = VmMemory(mib(4000), TICK - 1, shrink, False, 3, hold_until)
    vm = idle(actual=mib(4000) + 5 * MiB, memory=mem)  # within the deadband of the target
    d = decide(host(25), [vm], KNOBS, TICK).decisions[0]
    assert d.reason.startswith("hold:")
    assert d.memory == VmMemory(mib(4000), TICK - 1, shrink, True, failures_after, hold_until)


def test_repeated_deflate_on_oom_take_backs_escalate_the_back_off() -> None:
    """Shrink reached, taken back, backed off; after the back-off, again: the wait doubles."""
    waits = []
    mem = VmMemory()
    tick = 100
    for _ in range(3):
        tick = max(tick, mem.hold_until) + 1
        # A shrink target that the guest reached ...
        mem = replace(mem, target=mib(3000), set_tick=tick - 1, shrink=True, reached=False)
        reached = idle(actual=mib(3000), memory=mem)
        mem = decide(host(25), [reached], KNOBS, tick).decisions[0].memory
        assert mem.reached
        # ... and then took back through deflate-on-OOM.
        tick += 1
        took = idle(actual=mib(3500), memory=mem)
        d = decide(host(25), [took], KNOBS, tick).decisions[0]
        assert d.reason.startswith("back off: guest took memory back")
        waits.append(d.memory.hold_until - tick)
        mem = d.memory
    assert waits == [2, 4, 8]


@pytest.mark.parametrize(
    ("doom", "shrink", "rise", "prefix"),
    [
        pytest.param(True, True, 128 * MiB, "back off:", id="deflate-on-oom-backs-off"),
        pytest.param(False, True, 128 * MiB, "give:", id="without-deflate-on-oom"),
        pytest.param(True, False, 128 * MiB, "give:", id="after-a-grow"),
        pytest.param(True, True, 8 * MiB, "give:", id="rise-within-deadband"),
    ],
)
def test_deflate_on_oom(doom: bool, shrink: bool, rise: int, prefix: str) -> None:
    """A reached shrink followed by the guest rising above the target: backed off only with
    deflate-on-OOM, after a shrink, by more than the deadband; else the host (under
    pressure) asks again."""
    mem = VmMemory(mib(3968), TICK - 5, shrink, True, 0, 0)
    vm = idle(actual=mib(3968) + rise, doom=doom, memory=mem)
    d = decide(host(19), [vm], KNOBS, TICK).decisions[0]
    assert d.reason.startswith(prefix), d.reason
    assert d.send
    if prefix == "back off:":
        assert "deflate-on-OOM" in d.reason
        assert d.target == vm.actual
        assert d.memory == VmMemory(vm.actual, TICK, False, True, 1, TICK + 2)
    else:
        assert d.target == vm.actual - 128 * MiB
        assert d.memory.failures == 0


def test_in_flight_growth_not_reached_is_forgotten() -> None:
    mem = VmMemory(mib(4096 + 128), TICK - 10, False, False, 2, 0)
    d = decide(host(40), [idle(memory=mem)], KNOBS, TICK).decisions[0]
    assert d.reason.startswith("grow back:"), d.reason
    assert d.target == mib(4096 + 128)
    assert d.memory.failures == 2


# --------------------------------------------------------------------------------------------
# Host modes, and the rounding regressions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pct", "psi", "mode"),
    [
        (0, None, HostMode.CRITICAL),
        (4.99, None, HostMode.CRITICAL),
        (5, None, HostMode.PRESSURE),
        (19.99, None, HostMode.PRESSURE),
        (20, None, HostMode.BALANCED),
        (30, None, HostMode.BALANCED),
        (30.01, None, HostMode.CALM),
        (100, None, HostMode.CALM),
        (50, 9.99, HostMode.CALM),
        (50, 10.0, HostMode.PRESSURE),
        (4, 50.0, HostMode.CRITICAL),
    ],
    ids=str,
)
def test_host_mode(pct: float, psi: float | None, mode: HostMode) -> None:
    assert host_mode(HostState(100 * GiB, int(100 * GiB * pct / 100), psi), KNOBS)[0] is mode


def test_host_without_memory_is_critical() -> None:
    assert host_mode(HostState(0, 0), KNOBS)[0] is HostMode.CRITICAL


def test_grow_rounded_below_an_unaligned_actual_is_not_sent() -> None:
    """Regression: in critical mode a guest just under guest_low needs only a few KiB more;
    rounding actual + grant down to whole MiB gave a target below actual, so the "grow"
    shrank a guest under its own pressure."""
    actual = 1000 * MiB + 900 * 1024
    vm = guest("hungry", actual=actual, stats={"available-memory": int(actual * 0.0999)})
    plan = decide(HostState(64 * GiB, 2 * GiB), [vm, idle("giver")], KNOBS, TICK)
    assert plan.mode is HostMode.CRITICAL
    d = plan.decisions[0]
    assert not d.send, d
    assert d.target == actual


def test_give_rounded_above_an_unaligned_actual_is_not_sent_when_calm() -> None:
    """Regression: in calm mode a giver whose take is smaller than actual's part of a MiB got
    a "give:" target above where it was (rounded up toward actual, past it)."""
    ga = 1000 * MiB + 900 * 1024
    used = int((ga - 200 * 1024) * 0.8)
    giver = guest("giver", actual=ga, maximum=2 * GiB, stats={"available-memory": ga - used})
    pair = [hungry("h1", actual=2 * GiB), hungry("h2", actual=2 * GiB)]
    plan = decide(HostState(GiB, int(0.31 * GiB)), [*pair, giver], NO_DEADBAND, TICK)
    assert plan.mode is HostMode.CALM
    d = plan.decisions[2]
    assert not d.send, d
    assert d.target == ga


def test_guest_shrunk_to_its_critical_need_is_not_under_pressure_after() -> None:
    """Regression: need was truncated, so a guest shrunk to it (critical headroom 10 % =
    guest_low) had a hair under 10 % available and grew straight back in pressure mode."""
    used = 944662119  # used / 0.9 = 1001 MiB + 0.67 B
    vm = guest("x", actual=2 * GiB, maximum=2 * GiB, stats={"available-memory": 2 * GiB - used})
    first = decide(HostState(80 * GiB, 0), [vm], BIG, TICK).decisions[0]
    assert first.reason.startswith("give:")
    assert first.target == mib(1002)
    after = guest(
        "x",
        actual=first.target,
        maximum=2 * GiB,
        stats={"available-memory": first.target - used},
        memory=first.memory,
    )
    plan = decide(HostState(80 * GiB, 6 * GiB), [after, idle()], BIG, TICK + 1)
    assert plan.mode is HostMode.PRESSURE
    d = plan.decisions[0]
    assert not d.send, d
    assert not d.reason.startswith("grow"), d.reason


def test_a_floor_raise_that_got_within_the_deadband_is_not_sent_again() -> None:
    """Raised to its floor and arrived a few pages short (within the deadband): the raise
    is not re-sent every tick; a VM pushed well below its floor again is raised again."""
    floor = 2 * GiB
    first = decide(host(25), [idle(actual=1 * GiB, floor=floor)], KNOBS, 1).decisions[0]
    assert first.send and first.target == floor and first.reason.startswith("raise to its floor")
    short = floor - 8 * 4096
    again = decide(host(25), [idle(actual=short, floor=floor, memory=first.memory)], KNOBS, 2)
    assert not again.decisions[0].send, again.decisions[0]
    pushed = decide(
        host(25), [idle(actual=1 * GiB, floor=floor, memory=again.decisions[0].memory)], KNOBS, 3
    ).decisions[0]
    assert pushed.send and pushed.target == floor


def test_zero_shares_do_not_crash_the_policy() -> None:
    """The config never makes shares 0, but VmState can hold it: weighted as 1."""
    plan = decide(host(10), [idle("a", shares=0), idle("b", shares=1)], KNOBS, 1)
    assert all(d.send and d.reason.startswith("give:") for d in plan.decisions)


def test_a_release_spread_over_many_vms_still_moves_some_of_them() -> None:
    """2.5 GiB to free over 1000 idle 256 MiB guests is 2.5 MiB each, under every guest's
    deadband: split evenly, nobody would move. The idle-est guests give a real step instead."""
    small = [
        guest(f"vm{i}", 60.0 + (i % 7), actual=256 * MiB, maximum=256 * MiB) for i in range(1000)
    ]
    total = HOST_TOTAL
    host_state = HostState(total, int(total * 0.25) - (2560 * MiB))  # 2.5 GiB below the midpoint
    plan = decide(host_state, small, KNOBS, 1)
    givers = [d for d in plan.decisions if d.send]
    assert givers and all(d.reason.startswith("give:") for d in givers)
    assert all(d.current - d.target > 6 * MiB for d in givers)  # real steps, not crumbs
    # The idle-est give first: every giver is at least as idle as every holder.
    idleness = {vm.name: vm.stats["available-memory"] for vm in small if vm.stats}
    held = [d for d in plan.decisions if not d.send]
    assert min(idleness[d.vm] for d in givers) >= max(idleness[d.vm] for d in held)


def test_a_calm_budget_spread_over_many_vms_grows_the_most_shrunk_first() -> None:
    vms = [
        guest(f"vm{i}", 60.0, actual=(128 + i % 64) * MiB, maximum=256 * MiB) for i in range(1000)
    ]
    total = HOST_TOTAL
    plan = decide(HostState(total, int(total * 0.30) + 200 * MiB), vms, KNOBS, 1)
    grown = [d for d in plan.decisions if d.send]
    assert grown and all(d.reason.startswith("grow back:") for d in grown)
    assert sum(d.target - d.current for d in grown) <= 200 * MiB
    held = [d for d in plan.decisions if not d.send]
    assert max(d.current for d in grown) <= min(d.current for d in held)
