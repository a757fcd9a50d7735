"""A small guest memory with one queue laid out by the mock driver: the device-side tests'
common starting point (tests/virtio/)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pytest

from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.mock import BumpAllocator, MockDriverQueue

MEM_SIZE: Final = 1 << 20  # 1 MiB: 256 pages


@dataclass
class Ring:
    """A queue of size 8 at the start of a 1 MiB guest, and a heap for buffers after it."""

    mem: GuestMemory
    driver: MockDriverQueue
    heap: BumpAllocator

    @property
    def layout(self) -> RingLayout:
        return self.driver.layout


@pytest.fixture
def ring() -> Iterator[Ring]:
    """A fresh :class:`Ring` per test; its guest memory is unmapped afterwards."""
    with GuestMemory.simple(MEM_SIZE) as mem:
        layout = RingLayout.packed(8)
        yield Ring(mem, MockDriverQueue(mem, layout), BumpAllocator(0x1000, MEM_SIZE))
