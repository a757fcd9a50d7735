"""Shared fixtures: a small guest memory with one queue laid out by the mock driver, and a
path for a QMP socket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.mock import BumpAllocator, MockDriverQueue, RingLayout

MEM_SIZE = 1 << 20  # 1 MiB: 256 pages


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
    with GuestMemory.simple(MEM_SIZE) as mem:
        layout = RingLayout.packed(8)
        yield Ring(mem, MockDriverQueue(mem, layout), BumpAllocator(0x1000, MEM_SIZE))


@pytest.fixture
def sock() -> Iterator[str]:
    """A QMP socket path in a fresh directory under /tmp.

    AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    """
    directory = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
    yield os.path.join(directory, "qmp.sock")
    shutil.rmtree(directory, ignore_errors=True)
