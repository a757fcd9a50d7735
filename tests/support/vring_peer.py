"""A fake QEMU whose balloon queues and guest memory the test writes itself: for what no
honest guest does (rings outside RAM, windows wider than the queue, buffers in MMIO), served
by tests/backends/hostile_peer.py on a real unix socket. Its ``pmemsave`` log proves what
``balloonctl vring dump`` read, and what it did not."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.memory import GuestMemory
from balloonctl.virtio.mock import MockDriverQueue
from tests.backends.hostile_peer import Fail, FakeQemu, GiB, MiB, Return, Script

#: The fake VM's guest memory that holds bytes; RAM above it reads as zeros.
LOW: Final = 16 * MiB
#: Where the fake guest's rings and buffers go.
RING_BASE: Final = 1 * MiB
BUFFERS: Final = 2 * MiB


class FakeVm(FakeQemu):
    """FakeQemu plus x-query-virtio-queue-status and pmemsave on test-written memory.

    ``ram`` is what QEMU reports; only the first :data:`LOW` bytes hold anything (a ring
    image written through :class:`MockDriverQueue`), the rest reads as zeros, and every
    pmemsave is logged by the peer, so a test can say exactly what was read.
    """

    def __init__(
        self,
        *,
        ram: int = 2 * GiB,
        machine: str | None = None,
        host_split: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(ram=ram)
        self.mem = GuestMemory.simple(LOW)
        self.queues: dict[int, dict[str, object]] = {}
        self.machine = machine
        self.host_split = host_split

    def queue(
        self, index: int, layout: RingLayout, *, used_idx: int = 0, last_avail: int = 0
    ) -> MockDriverQueue:
        """A driver queue in the fake memory, and QEMU's answer describing it."""
        driver = MockDriverQueue(self.mem, layout)
        self.set_status(
            index,
            size=layout.size,
            desc=layout.desc,
            avail=layout.avail,
            used=layout.used,
            used_idx=used_idx,
            last_avail=last_avail,
        )
        return driver

    def set_status(
        self,
        index: int,
        *,
        size: int,
        desc: int,
        avail: int,
        used: int,
        used_idx: int = 0,
        last_avail: int = 0,
    ) -> None:
        # VirtQueueStatus (qapi/virtio.json), as QEMU 7.2 answers it.
        self.queues[index] = {
            "name": "virtio-balloon",
            "queue-index": index,
            "inuse": (last_avail - used_idx) & 0xFFFF,
            "vring-num": size,
            "vring-num-default": size,
            "vring-align": 4096,
            "vring-desc": desc,
            "vring-avail": avail,
            "vring-used": used,
            "last-avail-idx": last_avail,
            "shadow-avail-idx": last_avail,
            "used-idx": used_idx,
            "signalled-used": used_idx,
            "signalled-used-valid": False,
        }

    def do_x_query_virtio_queue_status(self, args: Mapping[str, object]) -> Script:
        index = args.get("queue")
        if not isinstance(index, int) or index not in self.queues:
            return [Fail("GenericError", f"Invalid virtqueue number {index}")]
        return [Return(self.queues[index])]

    def do_pmemsave(self, args: Mapping[str, object]) -> Script:
        addr, size, path = args.get("val"), args.get("size"), args.get("filename")
        assert isinstance(addr, int) and isinstance(size, int) and isinstance(path, str)
        data = bytearray(size)
        lo, hi = max(addr, 0), min(addr + size, LOW)
        if lo < hi:
            data[lo - addr : hi - addr] = self.mem.read(lo, hi - lo)
        Path(path).write_bytes(bytes(data))
        return [Return({})]

    def do_qom_get(self, args: Mapping[str, object]) -> Script:
        path, prop = args.get("path"), args.get("property")
        if path == "/machine" and prop == "type" and self.machine is not None:
            return [Return(self.machine)]
        if path == "/machine/q35" and self.host_split is not None:
            if prop == "below-4g-mem-size":
                return [Return(self.host_split[0])]
            if prop == "above-4g-mem-size":
                return [Return(self.host_split[1])]
        return super().do_qom_get(args)
