"""Whole scenarios through the hermetic testbed: the seed's driver model against the device,
on both paths, with the invariants checked after every step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from balloonctl.errors import GuestModelError
from balloonctl.guest.allocator import PageState
from balloonctl.guest.driver import SG_CHUNK_PAGES, VmEvents
from balloonctl.guest.testbed import Testbed, TestbedConfig
from balloonctl.units import PAGE_SHIFT
from balloonctl.virtio import spec
from balloonctl.virtio.inspect import Decode, RingParams, parse_ring
from balloonctl.virtio.memory import Backing
from balloonctl.virtio.pages import compact, expand_ranges
from balloonctl.virtio.spec import BalloonQueue

PROFILES = ["seed-sg", "virtio-1.2"]  # SG path, legacy PFN path


def bed(**kwargs: Any) -> Testbed:
    return Testbed(TestbedConfig(**kwargs))


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def test_paths_are_what_the_profile_says(profile: str) -> None:
    with bed(profile=profile) as b:
        assert b.driver.use_sg is (profile == "seed-sg")
        assert b.device.form.value == ("sg" if profile == "seed-sg" else "pfn")


@pytest.mark.parametrize("pages", [1, 255, 256, 257, 4000, 12000])
def test_inflate_deflate_round_trip(profile: str, pages: int) -> None:
    with bed(profile=profile) as b:
        b.set_target(pages)
        b.check()
        assert b.device.balloon_pages == pages
        assert b.device.config.actual == pages
        b.set_target(pages // 3)
        b.check()
        assert b.driver.balloon.pages == pages // 3
        b.set_target(0)
        b.check()
        assert b.allocator.count(PageState.BALLOON) == 0


def test_legacy_path_sends_256_pfns_per_request() -> None:
    with bed(profile="virtio-1.2") as b:
        b.set_target(1000)
        # 256 + 256 + 256 + 232: four requests, one buffer each, 4 KiB of PFN arrays.
        assert b.driver.queues[BalloonQueue.INFLATE].counters.chains == 4
        assert b.device.counters.pfn_bytes == 1000 * 4


def test_sg_path_sends_runs_not_pages() -> None:
    with bed(profile="seed-sg") as b:
        b.set_target(12000)
        inflate = b.driver.queues[BalloonQueue.INFLATE].counters
        assert (inflate.chains, inflate.descriptors) == (1, 1)  # an idle guest: one run
        assert b.device.counters.pfn_bytes == 0


def test_fragmented_guest(profile: str) -> None:
    with bed(profile=profile, fragment_pages=7, used=24 << 20, seed=3) as b:
        b.set_target(6000)
        b.check()
        runs = b.driver.balloon.all_runs()
        assert len(runs) > 100  # really fragmented
        b.set_target(1500)
        b.check()


def test_queue_fills_mid_chain() -> None:
    # 8 descriptors, hundreds of runs: the driver publishes each full chain, kicks, waits
    # and starts a new one (virtqueue_add_chain_desc's queue-full path).
    with bed(profile="seed-sg", queue_size=8, fragment_pages=3, used=24 << 20, seed=1) as b:
        b.set_target(3000)
        b.check()
        vq = b.driver.queues[BalloonQueue.INFLATE].counters
        assert vq.chains > 10
        assert vq.descriptors > vq.chains * 7  # full chains but the last


def test_slow_device_gets_every_chain_before_the_driver_moves_on() -> None:
    # Deferred device, queue of 4: every full chain is published, kicked and waited for
    # before the next (the queue-full path), and a deflate still tells the host first.
    with bed(profile="seed-sg", deferred=True, queue_size=4, fragment_pages=3, used=24 << 20) as b:
        b.set_target(2500)
        b.check()
        b.set_target(700)  # deflate: MUST_TELL_HOST order under a slow device too
        b.check()
        assert b.driver.queues[BalloonQueue.INFLATE].in_flight == 0


@pytest.mark.parametrize("deferred", [False, True])
def test_run_of_4_gib_or_more_is_split(deferred: bool) -> None:
    # One contiguous run of 5 GiB. The seed's uint32_t sg_size would be 1 GiB (5 GiB mod
    # 2**32): the device would balloon 1 GiB of the 5 the guest gave. Split at 2**32 bytes
    # a chain (fix 5), the request is two chains behind one kick; with a slow device the
    # seed's single wait after that kick would leave the second unserved (fix 4).
    pages = 5 << 18
    with bed(
        profile="seed-sg", memory=6 << 30, backing=Backing.ANON, used=64 << 20, deferred=deferred
    ) as b:
        b.driver.record = []
        b.set_target(pages)
        b.check()
        assert b.device.balloon_pages == pages
        assert (pages << PAGE_SHIFT) & 0xFFFFFFFF == 1 << 30  # what the seed would send
        assert b.driver.queues[BalloonQueue.INFLATE].counters.descriptors == 2
        assert SG_CHUNK_PAGES << PAGE_SHIFT == spec.SG_CHUNK_MAX


def test_seed_loop_loses_the_last_page_and_ours_does_not() -> None:
    # Fix 2 in driver.py, shown on the seed's own loop: bits {10, 11, 13} over [10, 13].
    def seed_runs(bits: set[int], start: int, end: int) -> list[tuple[int, int]]:
        def find(frm: int, to: int, value: int) -> int:  # xb_find_next_bit; to+1 if none
            return next((i for i in range(frm, to + 1) if (i in bits) == bool(value)), to + 1)

        out = []
        while start < end:
            start = find(start, end, 1)
            if start == end + 1:
                break
            stop = find(start + 1, end, 0)
            out.append((start, stop - start))
            start = stop + 1
        return out

    assert seed_runs({10, 11, 13}, 10, 13) == [(10, 2)]  # page 13 never reaches the host
    with bed(profile="seed-sg") as b:
        b.allocator.state[:] = PageState.USED
        b.allocator.state[[20, 21, 23]] = PageState.FREE
        b.set_target(3)
        b.check()
        assert b.device.balloon_pages == 3


def test_deflate_on_oom(profile: str) -> None:
    with bed(profile=profile, memory=32 << 20, used=4 << 20) as b:
        b.set_target(5000)  # 20 MiB of 32
        free = b.allocator.count(PageState.FREE)
        got = b.guest_use(free + 1000)
        assert got == free + 1000
        assert b.driver.oom_deflated >= 1000
        b.check()
        assert b.device.config.actual == 5000 - b.driver.oom_deflated


def test_no_deflate_on_oom_without_the_feature() -> None:
    feats = ("must-tell-host", "stats-vq", "sg", "ring-event-idx", "version-1")
    with bed(profile="seed-sg", memory=32 << 20, used=4 << 20, features=feats) as b:
        b.set_target(5000)
        free = b.allocator.count(PageState.FREE)
        assert b.guest_use(free + 1000) == free
        assert b.driver.balloon.pages == 5000
        b.check()


def test_must_tell_host_order(profile: str) -> None:
    # When the device reads a deflate request, the guest must not have those pages back yet.
    with bed(profile=profile) as b:
        b.set_target(3000)
        seen: list[int] = []
        real = b.device.process

        def spy(role: BalloonQueue, limit: int | None = None):  # type: ignore[no-untyped-def]
            if role is BalloonQueue.DEFLATE:
                # The guest still counts as ballooned every page the device holds.
                seen.append(b.allocator.count(PageState.BALLOON))
                assert seen[-1] == b.device.balloon_pages
            return real(role, limit)

        b.device.process = spy  # type: ignore[method-assign]
        b.set_target(100)
        assert seen and seen[0] == 3000  # the spy ran, before any page went back
        b.check()


def test_stats_round_trip(profile: str) -> None:
    with bed(profile=profile) as b:
        b.set_target(2000)
        b.request_stats()
        assert b.device.stats is not None
        stats = b.device.stats.by_name()
        assert stats["free-memory"] == b.allocator.count(PageState.FREE) << PAGE_SHIFT
        assert stats["total-memory"] == 64 << 20
        assert b.device.counters.stats_updates == 2  # the primed buffer, then the refill


def test_stats_are_linux_6_12s_in_order_and_units(profile: str) -> None:
    """update_balloon_stats: the vm events (swap and scan/reclaim pages as bytes, the rest
    as counts; tags 10-15 between the faults and hugetlb), then the memory sizes."""
    with bed(profile=profile) as b:
        events = VmEvents(
            pswpin=3,
            pswpout=4,
            pgmajfault=5,
            pgfault=6,
            oom_kill=2,
            allocstall=17,
            pgscan_kswapd=700,
            pgscan_direct=110,
            pgsteal_kswapd=600,
            pgsteal_direct=90,
        )
        b.driver.vm_events = lambda: events  # type: ignore[method-assign]
        tags = [tag for tag, _ in b.driver.stats_values()]
        assert tags == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7]
        b.request_stats()
        assert b.device.stats is not None
        stats = b.device.stats.by_name()
        page = 1 << PAGE_SHIFT
        assert stats["swap-in"] == 3 * page and stats["swap-out"] == 4 * page
        assert (stats["major-faults"], stats["minor-faults"]) == (5, 6)
        assert stats["oom-kills"] == 2
        assert stats["alloc-stalls"] == 17
        assert stats["async-scans"] == 700 * page
        assert stats["direct-scans"] == 110 * page
        assert stats["async-reclaims"] == 600 * page
        assert stats["direct-reclaims"] == 90 * page
        # The plain counts are exactly the ones virtio.spec does not list as bytes.
        counts = {"major-faults", "minor-faults", "htlb-pgalloc", "htlb-pgfail"}
        assert {n for n in stats if n not in spec.BYTE_STATS} == counts | {
            "oom-kills",
            "alloc-stalls",
        }


def test_stats_of_a_guest_that_never_reclaims_are_true_zeros(profile: str) -> None:
    with bed(profile=profile) as b:
        b.set_target(2000)
        b.request_stats()
        assert b.device.stats is not None
        stats = b.device.stats.by_name()
        assert {name: stats[name] for name in spec.EXTENDED_STAT_NAMES} == dict.fromkeys(
            spec.EXTENDED_STAT_NAMES, 0
        )


def test_a_kernel_before_6_12_sends_the_classic_ten(profile: str) -> None:
    with bed(profile=profile) as b:
        b.driver.extended_stats = False
        b.request_stats()
        assert b.device.stats is not None
        assert sorted(b.device.stats.values) == list(range(10))
        assert not set(spec.EXTENDED_STAT_NAMES) & set(b.device.stats.by_name())


def test_migration(profile: str) -> None:
    with bed(profile=profile) as b:
        b.set_target(300)
        old = int(b.driver.balloon.all_runs()[0, 0]) + 7
        new = b.driver.migrate(old)
        b.check()
        old_i, new_i = b.allocator.to_dense(np.array([old, new])).tolist()
        assert b.allocator.state[old_i] == PageState.FREE
        # The device was told both halves: it holds the new page and gave the old one back.
        assert b.device.balloon[new_i] and not b.device.balloon[old_i]
        assert b.device.balloon_pages == 300
        with pytest.raises(GuestModelError):
            b.driver.migrate(old)  # no longer in the balloon


def _grouped(
    entries: list[tuple[BalloonQueue, list[list[int]]]],
) -> list[tuple[str, list[list[int]]]]:
    """Consecutive traffic on one queue, its pages merged: one SG request may take several
    chains (queue full, 4 GiB per chain) and one resize several legacy requests."""
    out: list[tuple[str, list[list[int]]]] = []
    for role, ranges in entries:
        if out and out[-1][0] == role.name:
            out[-1][1].extend(ranges)
        else:
            out.append((role.name, list(ranges)))
    return [
        (name, compact(expand_ranges(np.asarray(r, dtype=np.int64).reshape(-1, 2))).tolist())
        for name, r in out
    ]


@pytest.mark.parametrize("sg_indirect", [False, True])
def test_rings_parse_back_to_what_the_driver_meant(profile: str, sg_indirect: bool) -> None:
    # Differential: at each kick, the offline parser reads the rings the model wrote and
    # must find exactly the pages the driver meant to send, in the same order of requests.
    # With indirect tables, runs must be few enough to fit one 64-entry table per request.
    fragment = 300 if sg_indirect else 5
    with bed(
        profile=profile,
        fragment_pages=fragment,
        used=16 << 20,
        sg_indirect=sg_indirect,
        indirect_entries=64,
    ) as b:
        b.driver.record = []
        parsed: list[tuple[BalloonQueue, list[list[int]]]] = []
        consumed = 0
        real = b.device.process
        decode = Decode.SG if profile == "seed-sg" else Decode.PFN

        def spy(role: BalloonQueue, limit: int | None = None):  # type: ignore[no-untyped-def]
            nonlocal consumed
            queue = b.device.queues[role]
            if role in (BalloonQueue.INFLATE, BalloonQueue.DEFLATE):
                params = RingParams(
                    queue.size, queue.desc, queue.avail, queue.used, queue.last_avail_idx
                )
                out = parse_ring(b.mem, params, decode)
                assert out["error"] is None
                chains: list[dict[str, Any]] = out["chains"]  # type: ignore[assignment]
                assert all(c["rejected"] == [] for c in chains)
                parsed.append((role, [p for c in chains for p in c["pages"]]))
                consumed += sum(len(c["descriptors"]) for c in chains)
            return real(role, limit)

        b.device.process = spy  # type: ignore[method-assign]
        b.set_target(2000)
        b.set_target(500)
        b.driver.migrate(int(b.driver.balloon.all_runs()[0, 0]))
        b.check()
        meant = [(role, runs.tolist()) for role, runs in b.driver.record]
        assert _grouped(parsed) == _grouped(meant)
        table = sum(b.driver.queues[r].counters.descriptors for r in b.driver.queues)
        stats = b.driver.queues.get(BalloonQueue.STATS)
        table -= stats.counters.descriptors if stats else 0
        if sg_indirect and profile == "seed-sg":
            assert table < consumed  # indirect tables were used: fewer table descriptors
        else:
            assert table == consumed


@pytest.mark.parametrize("deferred", [False, True])
def test_fresh_chain_on_a_full_queue_waits_instead_of_dropping_the_run(deferred: bool) -> None:
    # Queue of 4; four 1 GiB runs fill one chain to exactly 2**32 bytes and every
    # descriptor; the fifth run starts a fresh chain on a full queue. The seed's
    # virtqueue_add_chain_desc returns -ENOSPC there and tell_host_sgs ignores it: the run
    # is lost (fix 3). The driver must kick what it published and wait instead.
    gib = 1 << 18  # pages
    with bed(
        profile="seed-sg",
        memory=6 << 30,
        backing=Backing.ANON,
        used=64 << 20,
        queue_size=4,
        deferred=deferred,
    ) as b:
        state = b.allocator.state
        state[:] = PageState.KERNEL
        starts = [(1 << 16) + k * (gib + 1) for k in range(5)]
        for s in starts:
            state[s : s + gib] = PageState.FREE
        b.set_target(5 * gib)
        b.check()
        assert b.device.balloon_pages == 5 * gib
