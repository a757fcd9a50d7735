"""Where a split queue's three parts sit in guest memory (virtio 1.2, 2.7).

A production type, not a test helper: the guest driver model lays out its rings with it,
the simulator hands it to the device, and the benchmarks, the corpus generator and the
mock driver (:mod:`balloonctl.virtio.mock`) all use it. It lives beside the parser
(:mod:`balloonctl.virtio.queue`) so that none of them reaches into the mock for it
(docs/architecture.md, ``virtio/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from balloonctl.virtio import spec


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align`` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where a queue's three parts are: the legacy layout (2.7.2) packed without padding."""

    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def packed(cls, size: int, base: int = 0) -> RingLayout:
        """Descriptor table at ``base``, the available ring after it, the used ring after
        that at its 4-byte alignment: the smallest legal footprint (2.7.1: 16, 2, 4)."""
        desc = align_up(base, spec.DESC_ALIGN)
        avail = desc + spec.desc_table_size(size)
        used = align_up(avail + spec.avail_ring_size(size), spec.USED_ALIGN)
        return cls(size, desc, avail, used)

    @property
    def end(self) -> int:
        """First byte after the used ring."""
        return self.used + spec.used_ring_size(self.size)
