"""Random sequences of host and guest actions through the testbed; invariants after each."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from balloonctl.guest.allocator import PageState
from balloonctl.guest.testbed import Testbed, TestbedConfig

RAM_PAGES = (16 << 20) >> 12  # a 16 MiB guest


class BalloonMachine(RuleBasedStateMachine):
    """One guest and its device; hypothesis picks the profile, the shape and the steps."""

    bed: Testbed

    @initialize(
        profile=st.sampled_from(["seed-sg", "virtio-1.2"]),
        fragment=st.sampled_from([0, 3, 40]),
        queue_size=st.sampled_from([4, 16, 128]),
        deferred=st.booleans(),
        sg_indirect=st.booleans(),
    )
    def start(
        self, profile: str, fragment: int, queue_size: int, deferred: bool, sg_indirect: bool
    ) -> None:
        self.bed = Testbed(
            TestbedConfig(
                memory=16 << 20,
                profile=profile,
                used=2 << 20,
                fragment_pages=fragment,
                queue_size=queue_size,
                deferred=deferred,
                sg_indirect=sg_indirect,
                indirect_entries=8,
            )
        )

    def teardown(self) -> None:
        if hasattr(self, "bed"):
            self.bed.close()

    @rule(pages=st.integers(0, RAM_PAGES))
    def set_target(self, pages: int) -> None:
        self.bed.set_target(pages)

    @rule(pages=st.integers(1, RAM_PAGES // 2))
    def guest_uses_memory(self, pages: int) -> None:
        self.bed.guest_use(pages)

    @rule(pages=st.integers(1, RAM_PAGES // 2))
    def guest_frees_memory(self, pages: int) -> None:
        self.bed.guest_free(pages)

    @precondition(lambda self: hasattr(self, "bed") and self.bed.driver.balloon.pages > 0)
    @rule(pick=st.integers(0, 1 << 30))
    def migrate(self, pick: int) -> None:
        pages = self.bed.allocator.pages_in(PageState.BALLOON)
        if self.bed.allocator.count(PageState.FREE) == 0:
            return
        self.bed.driver.migrate(int(pages[pick % pages.size]))

    @rule()
    def stats(self) -> None:
        self.bed.request_stats()

    @invariant()
    def guest_and_device_agree(self) -> None:
        if hasattr(self, "bed"):
            self.bed.check()
            assert self.bed.device.broken is None


BalloonMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=20, deadline=None)
TestBalloonMachine = BalloonMachine.TestCase


def test_machine_can_fail() -> None:
    # The invariant is not vacuous: a device that forgets a page is caught.
    with Testbed(TestbedConfig(memory=16 << 20, used=2 << 20)) as bed:
        bed.set_target(100)
        bed.device.balloon[bed.device.balloon.nonzero()[0][0]] = False
        with pytest.raises(Exception, match="differ"):
            bed.check()
